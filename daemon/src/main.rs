//! `sluice`: parse the command line, run the subcommand, exit with its code.
#![forbid(unsafe_code)]

mod admin;
mod check;
mod cli;
mod config;
mod reload;
mod rules;
mod run;

use std::process::ExitCode;

/// Exit code for bad usage or configuration (sysexits EX_USAGE).
pub(crate) const EXIT_USAGE: u8 = 64;

fn main() -> ExitCode {
    let cmd = match cli::parse() {
        Ok(cmd) => cmd,
        Err(failure) => {
            failure.print_message(100);
            return if failure.exit_code() == 0 { ExitCode::SUCCESS } else { ExitCode::from(EXIT_USAGE) };
        }
    };
    let result = match cmd {
        cli::Command::Check(args) => check::run(&args),
        // Bad configuration is a usage error (64); failing while starting or
        // running — or nft missing or refusing the ruleset — is 1.
        cli::Command::Run(overrides) => {
            config::resolve(overrides).map(|config| run::run(config).unwrap_or_else(failed))
        }
        cli::Command::Rules(action, rules) => Ok(match action {
            cli::RulesAction::Print => {
                print!("{}", rules.render());
                ExitCode::SUCCESS
            }
            cli::RulesAction::Apply => rules::apply(&rules).map_or_else(failed, |()| ExitCode::SUCCESS),
            cli::RulesAction::Remove => rules::remove().map_or_else(failed, |()| ExitCode::SUCCESS),
        }),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sluice: {e:#}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

/// A failure while doing the work (not bad usage): said, and exit 1.
fn failed(e: anyhow::Error) -> ExitCode {
    eprintln!("sluice: {e:#}");
    ExitCode::FAILURE
}
