//! Test support for syncfleet: `notion-sim` (a Notion API double) and the end-to-end harness.

pub mod bench;
pub mod chaos;
pub mod fleet;
pub mod harness;
pub mod private;
pub mod sim;
pub mod verify;
