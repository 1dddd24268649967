//! The order service: its HTTP API on a SQL database, and the relay that publishes the
//! `OrderPaid` events of its outbox to a Redis Stream, until Ctrl-C.
//!
//! ```text
//! cargo run -p idem-examples --bin order-service -- \
//!     --database-url sqlite://orders.db --redis-url redis://127.0.0.1:6379/ --listen 127.0.0.1:8080
//!
//! curl -i -X POST localhost:8080/orders -H 'content-type: application/json' \
//!     -H 'x-client-id: shop' -H 'idempotency-key: 5f1c…' -d '{"user_id": 7, "amount_cents": 12000}'
//! curl -i -X POST localhost:8080/orders/O-…/pay
//! ```
//!
//! The HTTP API serves without Redis: the relay keeps trying to reach it (logging the URL) and
//! publishes the outbox once it can. On Ctrl-C the server stops taking requests, and the
//! creates still running (those whose clients went away too) finish before it exits.
//!
//! `RUST_LOG` filters the log lines (default `info,idem_runtime=debug`: a line per request
//! with idem's outcome).

use std::process::ExitCode;
use std::time::Duration;

use idem_examples::events::ORDER_PAID_STREAM;
use idem_examples::orders::{OrderDb, OrderService, relay_until};
use idem_examples::points::PointsDb;
use idem_examples::stream::RedisStream;
use tokio_util::sync::CancellationToken;

const USAGE: &str = "\
usage: order-service [options]

  --database-url URL   sqlite://FILE, postgres://… or mysql://… (env DATABASE_URL;
                       default sqlite://orders.db)
  --redis-url URL      the Redis the events go to (env REDIS_URL;
                       default redis://127.0.0.1:6379/)
  --listen ADDRESS     where the HTTP API listens (default 127.0.0.1:8080)
  --stream KEY         the stream (default orders.paid)
  --pause-each-create MS
                       fault injection: each create waits MS milliseconds after its
                       insert, before it answers and commits (default 0)
  -h, --help           this text";

/// The command line.
struct Args {
    database_url: String,
    redis_url: String,
    listen: String,
    stream: String,
    create_pause: Duration,
}

impl Args {
    fn parse() -> Result<Option<Self>, String> {
        let mut args = Self {
            database_url: std::env::var("DATABASE_URL")
                .unwrap_or_else(|_| "sqlite://orders.db".to_owned()),
            redis_url: std::env::var("REDIS_URL")
                .unwrap_or_else(|_| "redis://127.0.0.1:6379/".to_owned()),
            listen: "127.0.0.1:8080".to_owned(),
            stream: ORDER_PAID_STREAM.to_owned(),
            create_pause: Duration::ZERO,
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
                "--listen" => args.listen = value,
                "--stream" => args.stream = value,
                "--pause-each-create" => {
                    let millis = value.parse::<u64>().map_err(|_| {
                        format!("--pause-each-create `{value}`: expected milliseconds")
                    })?;
                    args.create_pause = Duration::from_millis(millis);
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
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,idem_runtime=debug".into()),
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
            eprintln!("order-service: {error}");
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
            eprintln!("order-service: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn serve<DB: OrderDb + PointsDb>(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    // The points module knows how to open each database (a SQLite file is created).
    let store = <DB as PointsDb>::connect(&args.database_url)
        .await
        .map_err(|error| format!("cannot open the database {}: {error}", args.database_url))?;
    let pool = <DB as PointsDb>::pool(&store).clone();
    let service = OrderService::new(pool.clone())
        .await
        .map_err(|error| format!("cannot create the tables in {}: {error}", args.database_url))?;
    service.pause_each_create(args.create_pause);
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|error| format!("cannot listen on {}: {error}", args.listen))?;
    println!(
        "order-service: listening on http://{}, orders in {}, events to stream `{}` at {}; Ctrl-C stops",
        listener.local_addr()?,
        <DB as sqlx::Database>::NAME,
        args.stream,
        args.redis_url,
    );

    let stop = CancellationToken::new();
    let relay = tokio::spawn(relay_when_reachable(
        pool,
        args.redis_url.clone(),
        args.stream.clone(),
        stop.clone(),
    ));
    let shutdown = {
        let stop = stop.clone();
        async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                println!("order-service: stopping");
            }
            stop.cancel();
        }
    };
    axum::serve(listener, service.router()?)
        .with_graceful_shutdown(shutdown)
        .await?;
    // Creates whose clients went away are still running: let them commit.
    service.finished().await;
    stop.cancel();
    relay.await?;
    Ok(())
}

/// Connects to the stream (trying again every second while Redis cannot be reached, so the
/// HTTP API serves meanwhile), then relays the outbox until `stop`.
async fn relay_when_reachable<DB: OrderDb>(
    pool: sqlx::Pool<DB>,
    redis_url: String,
    stream: String,
    stop: CancellationToken,
) {
    let mut logged = false;
    let stream = loop {
        match RedisStream::connect(&redis_url, &stream).await {
            Ok(stream) => break stream,
            Err(error) => {
                if !logged {
                    tracing::warn!(%error, url = %redis_url, "cannot reach the event stream's Redis; the outbox waits, retrying every second");
                    logged = true;
                }
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    };
    if logged {
        tracing::info!(url = %redis_url, "the event stream's Redis is reachable; relaying the outbox");
    }
    relay_until(&pool, &stream, Duration::from_millis(200), &stop).await;
}
