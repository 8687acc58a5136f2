//! Fault injection, compiled only for tests: [`failpoint!`](crate::failpoint) names a step of an
//! operation; a test arms it on one fleet's [`Failpoints`] to make the step fail (the enclosing
//! function returns [`Injected`]) or to stop the thread there for good (a `kill -9` simulated by
//! then dropping the daemon's runtime). Outside `cfg(test)` the macro expands to nothing, so
//! release builds carry no trace of it. Each fleet has its own registry: parallel tests never
//! see each other's points.

/// A step failed because a test armed its failpoint.
#[derive(Debug, Clone, thiserror::Error)]
#[error("injected failure at {0}")]
pub struct Injected(pub &'static str);

/// Returns `Err(Injected(name).into())` from the enclosing function when the fleet's test armed
/// `name` to fail; parks the thread forever when it was armed to hang. Nothing outside tests.
#[macro_export]
macro_rules! failpoint {
    ($fleet:expr, $name:literal) => {
        #[cfg(test)]
        {
            if let Err(injected) = $fleet.failpoints.hit($name) {
                return Err(injected.into());
            }
        }
    };
}

#[cfg(test)]
pub use registry::{Action, Failpoints};

#[cfg(test)]
mod registry {
    use std::collections::{HashMap, HashSet};
    use std::sync::{Condvar, Mutex};
    use std::time::{Duration, Instant};

    use super::Injected;

    /// What an armed failpoint does.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Action {
        /// The step fails with [`Injected`].
        Fail,
        /// The thread stops at the step and never goes on (nor unwinds: nothing is cleaned up).
        Hang,
    }

    #[derive(Debug, Default)]
    struct State {
        armed: HashMap<&'static str, Action>,
        hit: HashSet<&'static str>,
    }

    /// One fleet's failpoints.
    #[derive(Debug, Default)]
    pub struct Failpoints {
        state: Mutex<State>,
        changed: Condvar,
    }

    impl Failpoints {
        fn state(&self) -> std::sync::MutexGuard<'_, State> {
            self.state.lock().unwrap_or_else(|p| p.into_inner())
        }

        /// Arms `name` (once: it disarms itself when hit).
        pub fn arm(&self, name: &'static str, action: Action) {
            self.state().armed.insert(name, action);
        }

        /// Whether `name` was reached.
        pub fn was_hit(&self, name: &str) -> bool {
            self.state().hit.contains(name)
        }

        /// Every point reached so far.
        pub fn hits(&self) -> HashSet<&'static str> {
            self.state().hit.clone()
        }

        /// Waits until `name` is reached, for at most `timeout`; whether it was.
        pub fn wait_hit(&self, name: &str, timeout: Duration) -> bool {
            let deadline = Instant::now() + timeout;
            let mut state = self.state();
            while !state.hit.contains(name) {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return false;
                }
                state = self.changed.wait_timeout(state, left).map(|(s, _)| s).unwrap_or_else(|p| p.into_inner().0);
            }
            true
        }

        /// Called by [`failpoint!`](crate::failpoint): records the hit and acts if armed.
        pub fn hit(&self, name: &'static str) -> Result<(), Injected> {
            let action = {
                let mut state = self.state();
                state.hit.insert(name);
                let action = state.armed.remove(name);
                self.changed.notify_all();
                action
            };
            match action {
                None => Ok(()),
                Some(Action::Fail) => Err(Injected(name)),
                Some(Action::Hang) => {
                    tracing::debug!(failpoint = name, "parked for good");
                    loop {
                        std::thread::park();
                    }
                }
            }
        }
    }
}
