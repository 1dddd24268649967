//! The chaos run: consumers as child processes, killed and frozen mid-handler on a stream
//! full of duplicates, then every effect reconciled (see `idem_examples::chaos`).
//!
//! ```text
//! cargo run --release -p idem-examples --bin chaos -- \
//!     --database-url postgres://postgres@127.0.0.1/test --redis-url redis://127.0.0.1:6379/ \
//!     --deliveries 100000 --kills 50 --stalls 10
//! ```
//!
//! Exits 0 when every guarantee held, 1 when one broke (the report says which), 2 on bad
//! settings or a run that could not be carried out.

use std::process::ExitCode;
use std::time::Duration;

use idem_examples::chaos::{self, ChaosDb, ChildConfig, Config};

const USAGE: &str = "\
usage: chaos [options]            a chaos run, reconciled
       chaos consume [options]    one consumer (the run starts these itself)

  --database-url URL   postgres://… or mysql://… (env DATABASE_URL;
                       default postgres://postgres@127.0.0.1/test)
  --redis-url URL      the Redis of the stream and the claim records (env REDIS_URL;
                       default redis://127.0.0.1:6379/)
  --deliveries N       stream entries, duplicates included (default 4000)
  --duplicates SHARE   the share of them that are duplicate publishes (default 0.35)
  --consumers N        consumer processes at once (default 4)
  --kills N            SIGKILLs mid-handler (default 10)
  --stalls N           SIGSTOPs past the claim lease (default 2)
  --stall-for SECONDS  how long a stopped consumer stays stopped (default 4)
  --min-idle SECONDS   take over entries pending this long (default 1)
  --pause SECONDS      how long each body goes on after its effect, the window
                       the kills land in (default 0.005)
  --seed N             the plan's and the faults' seed (default 1)
  --quiet              no progress lines
  -h, --help           this text

consume only: --stream KEY --prefix PREFIX --consumer NAME (and the URLs, --min-idle)";

/// The command line, parsed.
enum Args {
    Help,
    Run(Config),
    Consume(ChildConfig),
}

fn parse() -> Result<Args, String> {
    let mut given = std::env::args().skip(1).peekable();
    let consume = given.peek().is_some_and(|first| first == "consume");
    if consume {
        given.next();
    }
    let program = std::env::current_exe().map_err(|error| format!("own path: {error}"))?;
    let database_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1/test".to_owned());
    let redis_url =
        std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".to_owned());
    let mut config = Config::new(&database_url, &redis_url, program);
    config.progress = true;
    let mut child = ChildConfig {
        database_url,
        redis_url,
        stream: String::new(),
        prefix: String::new(),
        consumer: format!("c-{}", std::process::id()),
        min_idle: config.min_idle,
        pause: config.pause,
    };
    while let Some(flag) = given.next() {
        match flag.as_str() {
            "-h" | "--help" => return Ok(Args::Help),
            "--quiet" => {
                config.progress = false;
                continue;
            }
            _ => {}
        }
        let value = given
            .next()
            .ok_or_else(|| format!("{flag} needs a value; try --help"))?;
        let number = || -> Result<usize, String> {
            value
                .parse()
                .map_err(|_| format!("{flag} takes a whole number, not `{value}`"))
        };
        let seconds = || -> Result<Duration, String> {
            value
                .parse::<f64>()
                .ok()
                .and_then(|s| Duration::try_from_secs_f64(s).ok())
                .ok_or_else(|| format!("{flag} takes seconds, not `{value}`"))
        };
        match flag.as_str() {
            "--database-url" => {
                config.database_url.clone_from(&value);
                child.database_url = value;
            }
            "--redis-url" => {
                config.redis_url.clone_from(&value);
                child.redis_url = value;
            }
            "--deliveries" => config.deliveries = number()?,
            "--duplicates" => {
                config.duplicates = value.parse().map_err(|_| {
                    format!("--duplicates takes a share such as 0.35, not `{value}`")
                })?;
            }
            "--consumers" => config.consumers = number()?,
            "--kills" => config.kills = number()?,
            "--stalls" => config.stalls = number()?,
            "--stall-for" => config.stall_for = seconds()?,
            "--min-idle" => {
                config.min_idle = seconds()?;
                child.min_idle = config.min_idle;
            }
            "--pause" => {
                config.pause = seconds()?;
                child.pause = config.pause;
            }
            "--seed" => config.seed = number()? as u64,
            "--stream" if consume => child.stream = value,
            "--prefix" if consume => child.prefix = value,
            "--consumer" if consume => child.consumer = value,
            other => return Err(format!("unknown option `{other}`; try --help")),
        }
    }
    Ok(if consume {
        Args::Consume(child)
    } else {
        Args::Run(config)
    })
}

/// Which database a URL names.
enum Database {
    Postgres,
    MySql,
}

fn database(url: &str) -> Result<Database, String> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Database::Postgres)
    } else if url.starts_with("mysql://") || url.starts_with("mariadb://") {
        Ok(Database::MySql)
    } else {
        Err(format!(
            "--database-url `{url}`: expected postgres://… or mysql://…"
        ))
    }
}

async fn run<DB: ChaosDb>(config: &Config) -> ExitCode {
    match chaos::run::<DB>(config).await {
        Ok(report) => {
            println!("{report}");
            if report.held() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(error) => {
            eprintln!("chaos: {error}");
            ExitCode::from(2)
        }
    }
}

async fn consume<DB: ChaosDb>(config: &ChildConfig) -> ExitCode {
    match chaos::consume::<DB>(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("chaos consumer {}: {error}", config.consumer);
            ExitCode::from(2)
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse() {
        Ok(args) => args,
        Err(error) => {
            eprintln!("chaos: {error}");
            return ExitCode::from(2);
        }
    };
    match args {
        Args::Help => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Args::Run(config) => match database(&config.database_url) {
            Ok(Database::Postgres) => run::<sqlx::Postgres>(&config).await,
            Ok(Database::MySql) => run::<sqlx::MySql>(&config).await,
            Err(error) => {
                eprintln!("chaos: {error}");
                ExitCode::from(2)
            }
        },
        Args::Consume(child) => match database(&child.database_url) {
            Ok(Database::Postgres) => consume::<sqlx::Postgres>(&child).await,
            Ok(Database::MySql) => consume::<sqlx::MySql>(&child).await,
            Err(error) => {
                eprintln!("chaos consumer: {error}");
                ExitCode::from(2)
            }
        },
    }
}
