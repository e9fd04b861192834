//! `proxsmtpd`: the command line, start-up order and signals.

use std::process::ExitCode;

use proxsmtpd::process::cli::{self, Command};

fn main() -> ExitCode {
    proxsmtpd::process::app::close_inherited_descriptors();
    proxsmtpd::process::app::clear_inherited_signal_mask();
    // As a container's entry point it is process 1, which every orphan of the namespace
    // that no subreaper takes is handed to: it stays a small init around the proxy.
    if proxsmtpd::process::init::is_process_one() {
        return proxsmtpd::process::init::supervise();
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Hidden: the manual pages, generated from the settings list (see src/process/man.rs).
    if args.first().map(String::as_str) == Some("--man") {
        return match args.get(1).and_then(|s| proxsmtpd::process::man::page(s)) {
            Some(page) if args.len() == 2 => {
                print!("{page}");
                ExitCode::SUCCESS
            }
            _ => {
                eprintln!("usage: proxsmtpd --man 8|5");
                ExitCode::from(2)
            }
        };
    }
    match cli::parse(&args) {
        Ok(Command::Version) => {
            print!("{}", cli::version_text());
            ExitCode::SUCCESS
        }
        Ok(Command::Help) => {
            print!("{}", cli::help_text());
            ExitCode::SUCCESS
        }
        Ok(Command::Run(run_args)) => proxsmtpd::process::app::run(run_args),
        Ok(Command::Demo(demo_args)) => proxsmtpd::process::demo::main(demo_args),
        Err(e) => {
            if !e.message.is_empty() {
                eprintln!("proxsmtpd: {}", e.message);
            }
            if e.usage {
                eprint!("{}", cli::usage_text());
            }
            ExitCode::from(e.exit_code.clamp(0, 255) as u8)
        }
    }
}
