//! End-to-end tests for secretfs live in `tests/`; `tests/integration/common.rs`
//! starts the real binary (server, CLI, mount) in fresh temporary
//! directories. This library is empty on purpose.

#![forbid(unsafe_code)]
