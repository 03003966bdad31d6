fn main() -> std::process::ExitCode {
    drover_cli::main()
}
