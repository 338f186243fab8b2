fn main() -> std::process::ExitCode {
    presenced::cli::main()
}
