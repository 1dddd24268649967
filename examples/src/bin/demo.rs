//! idem's end-to-end demo: the order service (HTTP, `Idempotency-Key`, guarded transitions,
//! an outbox) and the points service (a consumer group crediting points in one transaction)
//! in one process, with the faults of at-least-once delivery injected — retried and
//! concurrent requests, a relay whose stream reply is lost, producer resends, a lost ack, a
//! consumer killed mid-handler — then reconciled against the databases.
//!
//! ```text
//! cargo run -p idem-examples --bin demo                  # SQLite file in a temp dir, in-process stream
//! cargo run -p idem-examples --bin demo -- \
//!     --database-url postgres://postgres@127.0.0.1:5432/test --redis-url redis://127.0.0.1:6379/
//! ```
//!
//! Exits 0 when every effect happened exactly once, 1 on a lost or doubled effect, 2 when the
//! demo could not run. The steps are described in `idem_examples::demo`.

use std::process::ExitCode;

use idem_examples::demo::{self, Options};

const USAGE: &str = "\
usage: demo [options]

  --database-url URL   sqlite://FILE, postgres://… or mysql://… (env DATABASE_URL); both
                       services' tables go there and stay. Default: a SQLite file in a
                       temporary directory, removed at the end
  --redis-url URL      send the events through a Redis Stream (env REDIS_URL), under a
                       fresh key deleted at the end. Default: an in-process stream
  -q, --quiet          print only the reconciliation
  -h, --help           this text

RUST_LOG=idem_runtime=debug shows idem's tracing spans.";

/// The command line, or `None` for `--help`.
fn options() -> Result<Option<Options>, String> {
    let mut options = Options {
        database_url: std::env::var("DATABASE_URL").ok(),
        redis_url: std::env::var("REDIS_URL").ok(),
        quiet: false,
    };
    let mut given = std::env::args().skip(1);
    while let Some(flag) = given.next() {
        match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            "-q" | "--quiet" => options.quiet = true,
            "--database-url" | "--redis-url" => {
                let value = given
                    .next()
                    .ok_or_else(|| format!("{flag} needs a value; try --help"))?;
                if flag == "--database-url" {
                    options.database_url = Some(value);
                } else {
                    options.redis_url = Some(value);
                }
            }
            other => return Err(format!("unknown argument `{other}`; try --help")),
        }
    }
    Ok(Some(options))
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "off".into()),
        )
        .with_target(false)
        .init();
    let options = match options() {
        Ok(Some(options)) => options,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(error) => {
            eprintln!("demo: {error}");
            return ExitCode::from(2);
        }
    };
    match demo::run(&options).await {
        Ok(report) => {
            println!("\n{report}");
            if report.is_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(error) => {
            eprintln!("demo failed: {error}");
            ExitCode::from(2)
        }
    }
}
