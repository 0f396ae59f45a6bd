//! The `wick` command line: a thin layer over the library (see `wick::cli`).

use std::process::ExitCode;

// candle allocates a fresh buffer per op; mimalloc reuses freed pages instead of returning
// them to the OS, which removes most page faults (see docs/PERFORMANCE.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    wick::alloc::keep_freed_memory();
    match wick::cli::run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
