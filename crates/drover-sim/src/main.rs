//! `drover-sim`: a thin wrapper around the library.

fn main() -> std::process::ExitCode {
    drover_sim::main_entry()
}
