//! `polybus`: the command-line tool for the person operating a polybus bus.
//!
//! Every command takes the broker's URL from `--url` or `POLYBUS_URL`, prints
//! for a reader by default and JSON with `--json`, and exits with a code a
//! script can test (see `polybus --help`).
#![forbid(unsafe_code)]

mod bench;
mod dlq;
mod io;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use futures::StreamExt;
use polybus::{Bus, Message, Subscription};

use crate::io::{Out, exit_code};

const EXIT_CODES: &str = "\
Exit codes:
  0    success
  1    failed (an error the others do not name)
  2    invalid input: a bad argument, name or URL (nothing was done)
  3    the broker cannot be reached, or the connection was lost
  4    the broker refused the credentials or the virtual host
  5    timed out
  6    refused by the broker, or not supported by its backend
  130  interrupted (Ctrl-C); what was done is printed, nothing is lost";

/// Check a broker, publish, tail, operate dead letters and generate load,
/// through polybus, on RabbitMQ (amqp://), Kafka (kafka://) or the in-memory
/// broker (memory://, this process only).
#[derive(Parser, Debug)]
#[command(name = "polybus", version, after_help = EXIT_CODES)]
struct Cli {
    /// The broker: amqp://user:pass@host:5672/vhost, kafka://host:9092, memory://
    #[arg(
        long,
        short = 'u',
        env = "POLYBUS_URL",
        global = true,
        hide_env_values = true
    )]
    url: Option<String>,

    /// Print JSON (one object per line) instead of text
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Connect, and print the backend, its capabilities and limits
    Check,
    /// Publish to TOPIC one message per line of stdin or FILE (or the whole input as one)
    Publish(PublishArgs),
    /// Print what is published to topics matching PATTERN, acking each, until Ctrl-C
    Tail(TailArgs),
    /// Inspect, redrive and purge a group's dead letters
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),
    /// Generate load: producers and a consumer group, with a live rate and latency percentiles
    Bench(bench::BenchArgs),
}

#[derive(clap::Args, Debug)]
struct PublishArgs {
    /// The topic (words separated by dots: orders.created)
    topic: String,
    /// Read from FILE instead of stdin
    #[arg(long, short)]
    file: Option<std::path::PathBuf>,
    /// Send the whole input as one message (default: one message per non-empty line)
    #[arg(long)]
    whole: bool,
    /// The messages' key (messages with one key keep their order)
    #[arg(long, short)]
    key: Option<String>,
    /// A header, NAME=VALUE (repeatable)
    #[arg(long = "header", short = 'H', value_name = "NAME=VALUE")]
    headers: Vec<String>,
    /// The content type, such as application/json
    #[arg(long)]
    content_type: Option<String>,
    /// Deliver no earlier than SECONDS from now (at most seven days)
    #[arg(long, value_name = "SECONDS")]
    delay: Option<f64>,
}

#[derive(clap::Args, Debug)]
struct TailArgs {
    /// Topics to print: * matches one word, # zero or more (orders.#)
    pattern: String,
    /// Stop after N messages
    #[arg(long, short = 'n')]
    count: Option<u64>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("polybus: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let out = Out::new(cli.json);
    match runtime.block_on(run(cli, &out)) {
        Ok(code) => code,
        Err(e) => {
            out.error(&e);
            exit_code(e.kind())
        }
    }
}

async fn run(cli: Cli, out: &Out) -> polybus::Result<ExitCode> {
    let Some(url) = cli.url else {
        return Err(polybus::Error::invalid_input(
            "no broker: pass --url or set POLYBUS_URL (amqp://…, kafka://…, memory://)",
        ));
    };
    let bus = polybus::connect(&url).await?;
    let code = match cli.command {
        Command::Check => check(&bus, out),
        Command::Publish(args) => publish(&bus, args, out).await?,
        Command::Tail(args) => tail(&bus, args, out).await?,
        Command::Dlq(command) => dlq::run(&bus, command, out).await?,
        Command::Bench(args) => bench::run(&bus, args, out).await?,
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), bus.close()).await;
    Ok(code)
}

fn check(bus: &Bus, out: &Out) -> ExitCode {
    let caps = bus.capabilities();
    let names: Vec<String> = caps.iter().map(|c| c.to_string()).collect();
    let max_payload = caps.max_payload();
    if out.json {
        out.line(&serde_json::json!({
            "ok": true,
            "backend": bus.backend(),
            "polybus": env!("CARGO_PKG_VERSION"),
            "capabilities": names,
            "max_payload": max_payload,
        }));
    } else {
        println!("ok: connected");
        println!("backend: {}", bus.backend());
        println!("polybus: {}", env!("CARGO_PKG_VERSION"));
        println!("capabilities: {}", names.join(", "));
        match max_payload {
            Some(n) => println!("max payload: {n} bytes"),
            None => println!("max payload: not stated"),
        }
    }
    ExitCode::SUCCESS
}

async fn publish(bus: &Bus, args: PublishArgs, out: &Out) -> polybus::Result<ExitCode> {
    // Checked before reading the input, which may be a long stream.
    polybus::Topic::new(&args.topic)?;
    if polybus::Topic::is_reserved(&args.topic) {
        return Err(polybus::Error::invalid_input(format!(
            "topic `{}` is reserved: topics starting with `polybus.` are the library's",
            args.topic
        )));
    }
    let mut headers = Vec::with_capacity(args.headers.len());
    for h in &args.headers {
        let Some((name, value)) = h.split_once('=') else {
            return Err(polybus::Error::invalid_input(format!(
                "header `{h}` is not NAME=VALUE"
            )));
        };
        headers.push((name.to_owned(), value.to_owned()));
    }
    let delay = match args.delay {
        Some(s) if s.is_finite() && s >= 0.0 => Some(Duration::from_secs_f64(s)),
        Some(s) => {
            return Err(polybus::Error::invalid_input(format!(
                "invalid --delay {s}: seconds, zero or more"
            )));
        }
        None => None,
    };
    let input = io::read_input(args.file.as_deref()).await?;
    let payloads: Vec<&[u8]> = if args.whole {
        vec![&input[..]]
    } else {
        input
            .split(|b| *b == b'\n')
            .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
            .filter(|line| !line.is_empty())
            .collect()
    };
    let mut ids = Vec::with_capacity(payloads.len());
    for payload in payloads {
        let mut m = Message::new(payload.to_vec());
        if let Some(k) = &args.key {
            m = m.with_key(k.clone());
        }
        if let Some(ct) = &args.content_type {
            m = m.with_content_type(ct.clone());
        }
        for (name, value) in &headers {
            m = m.with_header(name.clone(), value.clone());
        }
        if let Some(d) = delay {
            m = m.deliver_after(d);
        }
        let id = m.id().to_owned();
        if let Err(e) = bus.publish(&args.topic, m).await {
            let published = ids.len();
            let (error, _) = e.into_parts();
            return Err(polybus::Error::new(
                error.kind(),
                format!("{error} (after {published} published)"),
            ));
        }
        if !out.json {
            println!("published {id}");
        }
        ids.push(id);
    }
    if out.json {
        out.line(&serde_json::json!({ "topic": args.topic, "published": ids.len(), "ids": ids }));
    } else {
        println!("{} published to {}", ids.len(), args.topic);
    }
    Ok(ExitCode::SUCCESS)
}

async fn tail(bus: &Bus, args: TailArgs, out: &Out) -> polybus::Result<ExitCode> {
    let mut stream = bus.subscribe(Subscription::new(&args.pattern)).await?;
    // On stderr even with --json: a script can wait for it to know that what
    // it publishes next will be printed.
    eprintln!("tailing {} (Ctrl-C to stop)", args.pattern);
    let mut seen = 0u64;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let interrupted = loop {
        if args.count.is_some_and(|n| seen >= n) {
            break false;
        }
        let d = tokio::select! {
            d = stream.next() => d,
            _ = &mut ctrl_c => break true,
        };
        let Some(d) = d else { break false };
        let d = d?;
        out.delivery(d.topic().as_str(), d.message(), d.attempt());
        d.ack().await?;
        seen += 1;
    };
    stream.close(Duration::from_secs(1)).await?;
    Ok(if interrupted {
        ExitCode::from(130)
    } else {
        ExitCode::SUCCESS
    })
}
