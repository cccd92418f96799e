//! The admin API and start-up, end to end.

mod support;

use support::*;

#[test]
fn placeholder() {}
