fn main() -> std::process::ExitCode {
    drover_server::cli::main()
}
