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
        // Bad configuration is a usage error (64); failing while starting or running is 1.
        cli::Command::Run(overrides) => config::resolve(overrides).map(|config| {
            run::run(config).unwrap_or_else(|e| {
                eprintln!("sluice: {e:#}");
                ExitCode::FAILURE
            })
        }),
        cli::Command::Rules(action, rules) => match action {
            cli::RulesAction::Print => {
                print!("{}", rules.render());
                Ok(ExitCode::SUCCESS)
            }
            // nft missing or refusing the ruleset: a failure (1), not bad usage.
            cli::RulesAction::Apply | cli::RulesAction::Remove => {
                let done =
                    if matches!(action, cli::RulesAction::Apply) { rules::apply(&rules) } else { rules::remove() };
                Ok(done.map_or_else(
                    |e| {
                        eprintln!("sluice: {e:#}");
                        ExitCode::FAILURE
                    },
                    |()| ExitCode::SUCCESS,
                ))
            }
        },
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sluice: {e:#}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}
