//! kiln-worker's runnable example. This library is empty; `worker.rs` beside it runs from
//! the workspace root with `cargo run --example worker`.
