//! Runnable examples for kiln. This library is empty; the examples live beside it and run
//! from the workspace root with `cargo run --example <name>`.
