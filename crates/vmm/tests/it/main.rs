//! Integration tests of banger-vmm. Real-guest tests (booting the Debian cloud kernel under QEMU)
//! run only with `BANGER_REAL_GUEST=1`; see [`real_guest`].

mod real_guest;
