//! The points service: one consumer of the `OrderPaid` stream's consumer group, crediting
//! each paid order's points exactly once, until Ctrl-C.
//!
//! ```text
//! cargo run -p idem-examples --bin points-service -- \
//!     --database-url sqlite://points.db --redis-url redis://127.0.0.1:6379/ --consumer points-1
//! ```
//!
//! Run several with different `--consumer` names against one Redis: each entry goes to one of
//! them, and what a killed one leaves pending is taken over by the others after `--min-idle`.
//! `RUST_LOG` filters the progress lines (default `info`).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use idem_examples::events::ORDER_PAID_STREAM;
use idem_examples::points::{Consumer, GROUP, Points, PointsDb};
use idem_examples::stream::{EventStream, RedisStream};
use tokio_util::sync::CancellationToken;

const USAGE: &str = "\
usage: points-service [options]

  --database-url URL   sqlite://FILE, postgres://… or mysql://… (env DATABASE_URL;
                       default sqlite://points.db)
  --redis-url URL      the Redis holding the stream (env REDIS_URL;
                       default redis://127.0.0.1:6379/)
  --consumer NAME      this consumer's name in the group (default points-<pid>)
  --stream KEY         the stream (default orders.paid)
  --group NAME         the consumer group (default points)
  --min-idle SECONDS   take over entries pending this long on other consumers (default 30)
  -h, --help           this text";

/// The command line.
struct Args {
    database_url: String,
    redis_url: String,
    consumer: String,
    stream: String,
    group: String,
    min_idle: Duration,
}

impl Args {
    fn parse() -> Result<Option<Self>, String> {
        let mut args = Self {
            database_url: std::env::var("DATABASE_URL")
                .unwrap_or_else(|_| "sqlite://points.db".to_owned()),
            redis_url: std::env::var("REDIS_URL")
                .unwrap_or_else(|_| "redis://127.0.0.1:6379/".to_owned()),
            consumer: format!("points-{}", std::process::id()),
            stream: ORDER_PAID_STREAM.to_owned(),
            group: GROUP.to_owned(),
            min_idle: Duration::from_secs(30),
        };
        let mut given = std::env::args().skip(1);
        while let Some(flag) = given.next() {
            if flag == "-h" || flag == "--help" {
                return Ok(None);
            }
            let value = given
                .next()
                .ok_or_else(|| format!("{flag} needs a value; try --help"))?;
            match flag.as_str() {
                "--database-url" => args.database_url = value,
                "--redis-url" => args.redis_url = value,
                "--consumer" => args.consumer = value,
                "--stream" => args.stream = value,
                "--group" => args.group = value,
                "--min-idle" => {
                    let seconds: f64 = value
                        .parse()
                        .map_err(|_| format!("--min-idle takes seconds, not `{value}`"))?;
                    args.min_idle = Duration::try_from_secs_f64(seconds)
                        .map_err(|_| format!("--min-idle takes seconds, not `{value}`"))?;
                }
                other => return Err(format!("unknown option `{other}`; try --help")),
            }
        }
        Ok(Some(args))
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_target(false)
        .init();
    let args = match Args::parse() {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(error) => {
            eprintln!("points-service: {error}");
            return ExitCode::from(2);
        }
    };
    let url = args.database_url.as_str();
    let served = if url.starts_with("sqlite:") {
        serve::<sqlx::Sqlite>(&args).await
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        serve::<sqlx::Postgres>(&args).await
    } else if url.starts_with("mysql://") || url.starts_with("mariadb://") {
        serve::<sqlx::MySql>(&args).await
    } else {
        Err(format!("--database-url `{url}`: expected sqlite:, postgres:// or mysql://").into())
    };
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("points-service: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn serve<DB: PointsDb>(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let points = Arc::new(Points::<DB>::connect(&args.database_url).await?);
    points.migrate().await?;
    let stream = RedisStream::connect(&args.redis_url, &args.stream).await?;
    stream.create_group(&args.group).await?;
    println!(
        "points-service: consumer `{}` of group `{}` on stream `{}`, points in {} \
         (tables {} and {}); Ctrl-C stops",
        args.consumer,
        args.group,
        args.stream,
        <DB as sqlx::Database>::NAME,
        points.tables().ledger(),
        points.tables().balances(),
    );

    let stop = CancellationToken::new();
    tokio::spawn({
        let stop = stop.clone();
        async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                println!("points-service: stopping after the entries in hand (Ctrl-C again quits)");
                stop.cancel();
                if tokio::signal::ctrl_c().await.is_ok() {
                    std::process::exit(130);
                }
            }
        }
    });

    let consumer =
        Consumer::new(stream, points, &args.group, &args.consumer).min_idle(args.min_idle);
    let tally = consumer.run(stop).await;
    println!("points-service: stopped; {tally}");
    Ok(())
}
