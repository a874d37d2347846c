//! Errors into messages that say what to do, and exit codes: 1 for an
//! error, 2 for a usage error.

use std::process::ExitCode;

use secretfs_proto::channel::ConnectFailure;
use tonic::Code;

/// A mistake in how the command was called (exit code 2).
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

pub fn report(err: &anyhow::Error) -> ExitCode {
    eprintln!("error: {}", message(err));
    if err.downcast_ref::<UsageError>().is_some() {
        return ExitCode::from(crate::EXIT_USAGE);
    }
    ExitCode::FAILURE
}

/// What `report` prints after "error: ".
pub fn message(err: &anyhow::Error) -> String {
    if let Some(usage) = err.downcast_ref::<UsageError>() {
        return usage.to_string();
    }
    if let Some(status) = err.downcast_ref::<tonic::Status>() {
        return crate::output::printable(&explain_status(status)).into_owned();
    }
    chain(err)
}

fn chain(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for (i, cause) in err.chain().enumerate() {
        let text = cause.to_string();
        if i > 0 {
            if out.contains(&text) {
                continue;
            }
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// A status from the server already says what to do; a transport failure
/// needs translating.
pub fn explain_status(status: &tonic::Status) -> String {
    let message = status.message();
    if status.metadata().contains_key("secretfs-audit-sink") {
        // The server refuses calls while its audit sink cannot write: its
        // message names the sink and the fix.
        return message.to_owned();
    }
    match status.code() {
        // The server itself answered UNAVAILABLE (its database is down, say):
        // its message says why and what to expect. A failure of the
        // connection always carries its cause as a source (tonic sets one);
        // a status decoded from the server's reply has none.
        Code::Unavailable if std::error::Error::source(status).is_none() && !message.is_empty() => {
            format!("the server is up but cannot serve this now: {message}")
        }
        Code::Unavailable | Code::Unknown | Code::Cancelled => {
            let detail = format!(
                "{message}{}",
                std::error::Error::source(status)
                    .map(|s| format!(": {}", secretfs_proto::channel::error_chain(s)))
                    .unwrap_or_default()
            );
            match ConnectFailure::classify(status) {
                ConnectFailure::Timeout => crate::connect::timed_out(Some(&detail))
                    .unwrap_or_else(|| ConnectFailure::Timeout.explain(&detail)),
                ConnectFailure::Other if status.code() == Code::Unavailable => {
                    format!("the server is unavailable ({detail}); is `secretfs server run` up at the address in SECRETFS_SERVER?")
                }
                failure => failure.explain(&detail),
            }
        }
        Code::OutOfRange | Code::ResourceExhausted if message.contains("message length too large") => format!(
            "the request is larger than the server accepts ({message}); secrets are limited by the server's \
             --max-secret-size (1 MiB by default): store a smaller value or raise the limit"
        ),
        _ => message.to_owned(),
    }
}
