//! Integration tests of banger-image against the real host tools.
//!
//! Gated by `BANGER_REAL_GUEST=1`: without it each test returns at once; with it a missing
//! prerequisite (apt metadata, mmdebstrap, root) fails the test with the reason.

mod real;
