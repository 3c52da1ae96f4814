//! The real servers of the tests (see the `testkit` crate).
pub use testkit::servers::*;
