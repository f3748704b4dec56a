//! `--config FILE`: a TOML file with one key per long flag of `agent` and `dev`
//! (README "Configuration file"). Precedence: flags > `HOLDFAST_*` variables > file >
//! defaults.
//!
//! It works over clap generically, so flags added later are configurable without
//! touching this file: after a first parse, every file key names a long flag, and its
//! value is appended to the command line only when clap says that flag's value came
//! from its default (or nowhere), never when it came from the command line or the
//! environment. The result is parsed again.

use std::ffi::OsString;
use std::path::Path;

use clap::parser::ValueSource;
use clap::{ArgAction, CommandFactory, FromArgMatches};

use crate::cli::{Cli, EXIT_CONFIG};

/// Why parsing stopped: clap's own output (help, version, a usage error) or a
/// configuration error; both carry the exit code.
#[derive(Debug)]
pub enum ParseExit {
    /// Help or version was printed, or clap rejected the command line.
    Clap(clap::Error),
    /// The config file could not be read or holds a bad key or value.
    Config(String),
}

impl ParseExit {
    /// The process exit code: 0 for help and version, [`EXIT_CONFIG`] for errors.
    pub fn code(&self) -> u8 {
        match self {
            ParseExit::Clap(e) if !e.use_stderr() => 0,
            _ => EXIT_CONFIG,
        }
    }

    /// Prints what a user should see.
    pub fn print(&self) {
        match self {
            ParseExit::Clap(e) => {
                let _ = e.print();
            }
            ParseExit::Config(m) => eprintln!("holdfast: {m}"),
        }
    }
}

/// Parses the command line (and the config file it names) into a [`Cli`].
pub fn parse_from(args: Vec<OsString>) -> Result<Cli, ParseExit> {
    let cmd = Cli::command();
    // The first pass only finds the file: a flag the file provides (`node-id`) must not
    // be missing yet.
    let lenient = cmd.clone().mut_subcommands(|c| c.mut_args(|a| a.required(false)));
    let matches = lenient.try_get_matches_from(&args).map_err(ParseExit::Clap)?;
    let mut args = args;
    if let Some((name, sub)) = matches.subcommand() {
        if let Some(file) = sub.try_get_one::<std::path::PathBuf>("config").ok().flatten() {
            let sub_cmd =
                cmd.find_subcommand(name).ok_or_else(|| ParseExit::Config(format!("no subcommand {name}")))?;
            args.extend(file_args(file, sub_cmd, sub)?);
        }
    }
    let matches = cmd.try_get_matches_from(&args).map_err(ParseExit::Clap)?;
    Cli::from_arg_matches(&matches).map_err(ParseExit::Clap)
}

/// The command-line arguments that bring in the file's values for every flag whose
/// value would otherwise be its default.
fn file_args(file: &Path, cmd: &clap::Command, matches: &clap::ArgMatches) -> Result<Vec<OsString>, ParseExit> {
    let shown = file.display();
    let text = std::fs::read_to_string(file).map_err(|e| ParseExit::Config(format!("config file {shown}: {e}")))?;
    let table: toml::Table =
        toml::from_str(&text).map_err(|e| ParseExit::Config(format!("config file {shown}: {}", e.message())))?;
    let mut out = Vec::new();
    for (key, value) in &table {
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()) && key != "config" && key != "help")
            .ok_or_else(|| {
                let hint = cmd
                    .get_arguments()
                    .filter_map(|a| a.get_long())
                    .find(|l| *l == key.replace('_', "-"))
                    .map(|l| format!(" (did you mean {l}?)"))
                    .unwrap_or_default();
                ParseExit::Config(format!(
                    "unknown key {key:?} in config file {shown}{hint}; keys are the long flags of `holdfast {}`",
                    cmd.get_name()
                ))
            })?;
        match matches.value_source(arg.get_id().as_str()) {
            Some(ValueSource::CommandLine) | Some(ValueSource::EnvVariable) => continue,
            _ => {}
        }
        let bad = |why: &str| ParseExit::Config(format!("config file {shown}: key {key:?} {why}"));
        if matches!(arg.get_action(), ArgAction::SetTrue) {
            match value {
                toml::Value::Boolean(true) => out.push(OsString::from(format!("--{key}"))),
                toml::Value::Boolean(false) => {}
                _ => return Err(bad("must be true or false")),
            }
            continue;
        }
        let items: Vec<String> = match value {
            toml::Value::Array(a) => {
                a.iter().map(scalar).collect::<Option<_>>().ok_or_else(|| bad("holds a list of non-scalar values"))?
            }
            toml::Value::Table(t) => t
                .iter()
                .map(|(k, v)| scalar(v).map(|v| format!("{k}={v}")))
                .collect::<Option<_>>()
                .ok_or_else(|| bad("holds a table of non-scalar values"))?,
            v => vec![scalar(v).ok_or_else(|| bad("has a value of an unsupported type"))?],
        };
        if items.len() > 1 && !matches!(arg.get_action(), ArgAction::Append) {
            return Err(bad("takes one value, not a list"));
        }
        for item in items {
            out.push(OsString::from(format!("--{key}={item}")));
        }
    }
    Ok(out)
}

fn scalar(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}
