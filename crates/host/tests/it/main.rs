//! Integration tests of banger-host. The networking tests (`net`) need root: each runs in a
//! child copy of this binary inside a private network namespace that dies with the child, so
//! they never touch the host's own interfaces or rulesets.

mod net;
