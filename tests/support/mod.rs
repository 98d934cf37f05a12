//! Helpers shared by the integration tests (each test file includes what it needs).
#![allow(dead_code)]

pub mod pg;
