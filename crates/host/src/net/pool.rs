//! [`TapPool`]: a warm pool of TAP devices already attached to the bridge and up, so that
//! creating a VM takes a device in O(1) without a netlink round trip. Pool devices are named
//! `bgpool{N}`; they are reusable capacity, not leaks: a released device goes back to the pool
//! (or is deleted when the pool is full), and a restarted daemon adopts the ones it finds.

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use banger_core::net::{pool_tap_index, pool_tap_name};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::{create_attached_tap, HostNet, HostNetError};

#[derive(Debug, Default)]
struct Inner {
    /// Ready devices, handed out from the front.
    idle: VecDeque<String>,
    /// Indices of every device the pool knows: idle, handed out or being made.
    indices: BTreeSet<u16>,
    /// Devices being made by [`TapPool::fill`] right now.
    pending: usize,
}

impl Inner {
    /// Reserves the lowest free index.
    fn reserve(&mut self) -> Option<u16> {
        let index = (0..=u16::MAX).find(|i| !self.indices.contains(i))?;
        self.indices.insert(index);
        Some(index)
    }
}

/// A warm pool of TAP devices on one bridge. See the module doc.
#[derive(Debug)]
pub struct TapPool<N> {
    net: Arc<N>,
    bridge: String,
    owner: Option<u32>,
    target: usize,
    inner: Mutex<Inner>,
    wake: Arc<Notify>,
}

impl<N> Drop for TapPool<N> {
    fn drop(&mut self) {
        // Lets a refiller task notice that the pool is gone.
        self.wake.notify_one();
    }
}

impl<N: HostNet> TapPool<N> {
    /// A pool that keeps `target` idle devices on `bridge`, owned by uid `owner` if given.
    /// It starts empty: call [`fill`](Self::fill), [`adopt`](Self::adopt) or
    /// [`spawn_refiller`](Self::spawn_refiller).
    pub fn new(net: Arc<N>, bridge: impl Into<String>, target: usize, owner: Option<u32>) -> Self {
        Self { net, bridge: bridge.into(), owner, target, inner: Mutex::default(), wake: Arc::new(Notify::new()) }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The critical sections below cannot panic; recover the data if one ever did.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How many idle devices the pool aims to keep.
    pub fn target(&self) -> usize {
        self.target
    }

    /// How many devices are ready to hand out.
    pub fn idle(&self) -> usize {
        self.lock().idle.len()
    }

    /// Hands out a ready device (attached and up), or `None` if the pool is empty. O(1), no
    /// netlink; wakes the refiller.
    pub fn take(&self) -> Option<String> {
        let tap = self.lock().idle.pop_front();
        self.wake.notify_one();
        tap
    }

    /// [`take`](Self::take), or when the pool is empty, makes a pool device on the spot (the
    /// cold path).
    pub async fn take_or_create(&self) -> Result<String, HostNetError> {
        if let Some(tap) = self.take() {
            return Ok(tap);
        }
        let index = self.lock().reserve().ok_or_else(|| exhausted(&self.bridge))?;
        let name = pool_tap_name(index);
        if let Err(e) = create_attached_tap(&*self.net, &name, self.owner, &self.bridge).await {
            self.lock().indices.remove(&index);
            return Err(e);
        }
        Ok(name)
    }

    /// Gives back a device handed out by [`take`](Self::take) once its VM is gone. It goes back
    /// to the pool while the pool is below its target and is deleted otherwise. Names that are
    /// not pool devices are left alone.
    pub async fn release(&self, name: &str) -> Result<(), HostNetError> {
        let Some(index) = pool_tap_index(name) else {
            tracing::warn!(tap = name, "not a pool device; left alone");
            return Ok(());
        };
        {
            let mut inner = self.lock();
            inner.indices.insert(index);
            if inner.idle.len() + inner.pending < self.target && !inner.idle.iter().any(|t| t == name) {
                inner.idle.push_back(name.to_owned());
                return Ok(());
            }
        }
        self.net.delete_link(name).await?;
        self.lock().indices.remove(&index);
        Ok(())
    }

    /// Makes devices until `target` are idle; returns how many it made. Safe to call
    /// concurrently: devices being made by another call count toward the target.
    pub async fn fill(&self) -> Result<usize, HostNetError> {
        let mut made = 0;
        loop {
            let index = {
                let mut inner = self.lock();
                if inner.idle.len() + inner.pending >= self.target {
                    return Ok(made);
                }
                let index = inner.reserve().ok_or_else(|| exhausted(&self.bridge))?;
                inner.pending += 1;
                index
            };
            let name = pool_tap_name(index);
            let result = create_attached_tap(&*self.net, &name, self.owner, &self.bridge).await;
            let mut inner = self.lock();
            inner.pending -= 1;
            match result {
                Ok(()) => {
                    inner.idle.push_back(name);
                    made += 1;
                }
                Err(e) => {
                    inner.indices.remove(&index);
                    return Err(e);
                }
            }
        }
    }

    /// Takes over the pool devices that already exist (after a daemon restart). Those named in
    /// `in_use` (devices of VMs that still exist) are only marked as handed out; the others are
    /// attached to the bridge, made guest ports bound to no VM, set up and become idle. Returns
    /// how many became idle.
    pub async fn adopt(&self, in_use: &BTreeSet<String>) -> Result<usize, HostNetError> {
        let mut adopted = 0;
        for link in self.net.links().await? {
            let Some(index) = pool_tap_index(&link.name) else { continue };
            if self.lock().indices.contains(&index) {
                continue;
            }
            if !in_use.contains(&link.name) {
                if link.controller.as_deref() != Some(self.bridge.as_str()) {
                    self.net.attach(&link.name, &self.bridge).await?;
                }
                self.net.isolate_port(&link.name).await?;
                // An idle device is bound to no VM (a killed daemon may have left an entry).
                self.net.bind_port_mac(&link.name, None).await?;
                if !link.up {
                    self.net.link_up(&link.name).await?;
                }
            }
            let mut inner = self.lock();
            if !inner.indices.insert(index) {
                continue;
            }
            if !in_use.contains(&link.name) {
                inner.idle.push_back(link.name);
                adopted += 1;
            }
        }
        Ok(adopted)
    }

    /// Deletes the idle devices (at daemon stop); devices handed out are left to their VMs.
    /// Returns the deleted names.
    pub async fn drain(&self) -> Result<Vec<String>, HostNetError> {
        let mut deleted = Vec::new();
        loop {
            let Some(name) = self.lock().idle.pop_front() else { return Ok(deleted) };
            self.net.delete_link(&name).await?;
            if let Some(index) = pool_tap_index(&name) {
                self.lock().indices.remove(&index);
            }
            deleted.push(name);
        }
    }
}

impl<N: HostNet + 'static> TapPool<N> {
    /// Starts a task that fills the pool now and again after every [`take`](Self::take). A
    /// failed fill is logged and retried at the next take, not in a loop. The task ends when
    /// the pool is dropped (or when the handle is aborted).
    pub fn spawn_refiller(self: &Arc<Self>) -> JoinHandle<()> {
        let pool: Weak<Self> = Arc::downgrade(self);
        let wake = Arc::clone(&self.wake);
        tokio::spawn(async move {
            loop {
                let Some(p) = pool.upgrade() else { return };
                if let Err(e) = p.fill().await {
                    tracing::warn!(bridge = %p.bridge, error = %banger_core::error_chain(&e), "could not refill the tap pool");
                }
                drop(p);
                wake.notified().await;
            }
        })
    }
}

fn exhausted(bridge: &str) -> HostNetError {
    HostNetError::Netlink {
        op: "reserve a pool tap name for",
        link: bridge.to_owned(),
        source: std::io::Error::other("all 65536 pool device names are in use"),
    }
}

#[cfg(test)]
mod tests {
    use super::super::{FakeNet, NetCall};
    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
    }

    fn pool(target: usize) -> (Arc<FakeNet>, TapPool<FakeNet>) {
        let net = Arc::new(FakeNet::default());
        rt().block_on(net.create_bridge("banger0")).expect("bridge");
        net.clear_calls();
        let pool = TapPool::new(Arc::clone(&net), "banger0", target, Some(1000));
        (net, pool)
    }

    #[test]
    fn fill_makes_attached_up_devices_and_take_uses_no_netlink() {
        let (net, pool) = pool(2);
        assert_eq!(rt().block_on(pool.fill()).expect("fill"), 2);
        assert_eq!(
            net.calls(),
            vec![
                NetCall::CreateTap { name: "bgpool0".into(), owner: Some(1000) },
                NetCall::Attach { link: "bgpool0".into(), bridge: "banger0".into() },
                NetCall::IsolatePort { link: "bgpool0".into() },
                NetCall::LinkUp { link: "bgpool0".into() },
                NetCall::CreateTap { name: "bgpool1".into(), owner: Some(1000) },
                NetCall::Attach { link: "bgpool1".into(), bridge: "banger0".into() },
                NetCall::IsolatePort { link: "bgpool1".into() },
                NetCall::LinkUp { link: "bgpool1".into() },
            ]
        );
        net.clear_calls();
        assert_eq!(pool.take().as_deref(), Some("bgpool0"));
        assert_eq!(pool.take().as_deref(), Some("bgpool1"));
        assert_eq!(pool.take(), None);
        assert!(net.calls().is_empty(), "the hot path made calls: {:?}", net.calls());
        // A refill skips the names still handed out.
        assert_eq!(rt().block_on(pool.fill()).expect("refill"), 2);
        assert_eq!(pool.take().as_deref(), Some("bgpool2"));
    }

    #[test]
    fn release_returns_to_pool_until_target_then_deletes() {
        let (net, pool) = pool(1);
        let rt = rt();
        rt.block_on(pool.fill()).expect("fill");
        let a = pool.take().expect("a");
        let b = rt.block_on(pool.take_or_create()).expect("cold b");
        assert_eq!((a.as_str(), b.as_str()), ("bgpool0", "bgpool1"));
        rt.block_on(pool.release(&a)).expect("release a");
        assert_eq!(pool.idle(), 1);
        net.clear_calls();
        rt.block_on(pool.release(&b)).expect("release b");
        assert_eq!(net.calls(), vec![NetCall::DeleteLink { name: "bgpool1".into() }]);
        assert_eq!(pool.take().as_deref(), Some("bgpool0"), "reused, not recreated");
        rt.block_on(pool.release("eth0")).expect("foreign names are ignored");
    }

    #[test]
    fn failed_fill_frees_the_name() {
        let (net, pool) = pool(1);
        net.fail_next(|c| matches!(c, NetCall::Attach { .. }));
        let err = rt().block_on(pool.fill()).expect_err("attach fails");
        assert_eq!(err.errno(), Some(libc::EIO));
        assert!(!rt().block_on(net.link_exists("bgpool0")).expect("query"), "half-made device deleted");
        rt().block_on(pool.fill()).expect("retry");
        assert_eq!(pool.take().as_deref(), Some("bgpool0"));
    }

    #[test]
    fn adopt_takes_over_existing_devices() {
        let (net, pool) = pool(2);
        let rt = rt();
        rt.block_on(async {
            create_attached_tap(&*net, "bgpool0", None, "banger0").await?;
            net.create_tap("bgpool3", None).await?; // detached and down: a crash mid-fill
            create_attached_tap(&*net, "bgpool5", None, "banger0").await?; // a running VM's
            net.create_tap("bgtap1", None).await
        })
        .expect("setup");
        let in_use: BTreeSet<String> = ["bgpool5".to_owned()].into();
        assert_eq!(rt.block_on(pool.adopt(&in_use)).expect("adopt"), 2);
        let s = rt.block_on(net.link("bgpool3")).expect("query").expect("exists");
        assert!(s.up && s.controller.as_deref() == Some("banger0"));
        assert!(net.is_isolated("bgpool3"), "adopted devices are isolated too");
        assert_eq!(rt.block_on(pool.fill()).expect("fill"), 0, "already at target");
        assert_eq!(pool.take().as_deref(), Some("bgpool0"));
        assert_eq!(pool.take().as_deref(), Some("bgpool3"));
        assert_eq!(rt.block_on(pool.take_or_create()).expect("cold").as_str(), "bgpool1");
        assert_eq!(rt.block_on(pool.drain()).expect("drain"), Vec::<String>::new());
    }

    #[test]
    fn refiller_keeps_the_pool_warm() {
        let (_net, pool) = pool(3);
        let pool = Arc::new(pool);
        rt().block_on(async {
            let task = pool.spawn_refiller();
            wait_for(|| pool.idle() == 3).await;
            pool.take().expect("one");
            pool.take().expect("two");
            wait_for(|| pool.idle() == 3).await;
            let deleted = pool.drain().await.expect("drain");
            assert_eq!(deleted.len(), 3);
            task.abort();
        });
    }

    async fn wait_for(cond: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while !cond() {
            assert!(tokio::time::Instant::now() < deadline, "condition not met in 5 s");
            tokio::task::yield_now().await;
        }
    }
}
