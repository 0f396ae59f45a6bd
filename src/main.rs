//! The `wick` command line: a thin layer over the library (see `wick::cli`).

use std::process::ExitCode;

// candle allocates a fresh buffer per op; mimalloc reuses freed pages instead of returning
// them to the OS, which removes most page faults (see docs/PERFORMANCE.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Output piped into `head` and closed: end quietly, as Unix tools do, rather than panic
    // in `println!` (Rust ignores SIGPIPE by default).
    // SAFETY: sets a signal's disposition to the default before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    wick::alloc::keep_freed_memory();
    match wick::cli::run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", wick::cli::describe(&e));
            ExitCode::from(2)
        }
    }
}
