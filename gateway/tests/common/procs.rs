//! Services as real processes, and the TCP proxy (see the `testkit` crate).
pub use testkit::procs::*;
