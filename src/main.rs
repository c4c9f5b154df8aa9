//! The `sandbox-bridge` binary: parses the command line and hands over to the library.

fn main() -> std::process::ExitCode {
    sandbox_bridge::cli::main()
}
