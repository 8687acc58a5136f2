//! VMM drivers behind one trait.
