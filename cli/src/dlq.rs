//! `polybus dlq`: a group's dead letters, for the person on call.

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use polybus::dead_letters::{MAX_HELD, Take};
use polybus::{Bus, DeadLetterRecord, DeadLetterReport, DeadLetters, Error};

use crate::io::{Out, millis};

#[derive(Subcommand, Debug)]
pub(crate) enum DlqCommand {
    /// How many dead letters wait for GROUP
    Count {
        /// The group whose dead letters these are
        group: String,
    },
    /// List GROUP's dead letters, oldest first, without settling them
    List {
        /// The group whose dead letters these are
        group: String,
        /// At most N
        #[arg(long, short = 'n', default_value_t = 20)]
        limit: usize,
    },
    /// Show dead letters in full (headers and payload): the one with ID, or the first N
    Show {
        /// The group whose dead letters these are
        group: String,
        /// A message id, or the start of one
        id: Option<String>,
        /// Without ID: the first N
        #[arg(long, short = 'n', default_value_t = 1)]
        limit: usize,
    },
    /// Send dead letters back to their original topics (attempts start again),
    /// each acked only once its publish is confirmed
    Redrive(Redrive),
    /// Drop dead letters for good (asks first unless --yes)
    Purge(Purge),
}

#[derive(Args, Debug)]
pub(crate) struct Select {
    /// The group whose dead letters these are
    group: String,
    /// At most N
    #[arg(long, short = 'n')]
    limit: Option<u64>,
    #[command(flatten)]
    criteria: Criteria,
    /// Print what would be taken, and take nothing
    #[arg(long)]
    dry_run: bool,
}

/// Which dead letters to take; all of them without any.
#[derive(Args, Debug, Clone)]
pub(crate) struct Criteria {
    /// Only those whose reason contains TEXT
    #[arg(long, value_name = "TEXT")]
    reason_contains: Option<String>,
    /// Only those first published to TOPIC
    #[arg(long)]
    topic: Option<String>,
    /// Only the message with ID (repeatable)
    #[arg(long = "id", value_name = "ID")]
    ids: Vec<String>,
}

impl Criteria {
    fn any(&self) -> bool {
        self.reason_contains.is_some() || self.topic.is_some() || !self.ids.is_empty()
    }

    fn matches(&self, r: &DeadLetterRecord) -> bool {
        self.reason_contains
            .as_ref()
            .is_none_or(|t| r.reason.contains(t.as_str()))
            && self.topic.as_ref().is_none_or(|t| &r.original_topic == t)
            && (self.ids.is_empty() || self.ids.contains(&r.id))
    }
}

#[derive(Args, Debug)]
pub(crate) struct Redrive {
    #[command(flatten)]
    select: Select,
    /// At most N a second
    #[arg(long, value_name = "N")]
    rate: Option<u32>,
}

#[derive(Args, Debug)]
pub(crate) struct Purge {
    #[command(flatten)]
    select: Select,
    /// Do not ask
    #[arg(long, short = 'y')]
    yes: bool,
}

impl Select {
    fn take(&self) -> Take {
        let mut take = Take::all();
        if let Some(n) = self.limit {
            take = take.limit(n);
        }
        if self.criteria.any() {
            let criteria = self.criteria.clone();
            take = take.matching(move |r| criteria.matches(r));
        }
        take
    }
}

pub(crate) async fn run(bus: &Bus, command: DlqCommand, out: &Out) -> polybus::Result<ExitCode> {
    match command {
        DlqCommand::Count { group } => {
            let n = bus.dead_letters(&group)?.count().await?;
            if out.json {
                out.line(&serde_json::json!({ "group": group, "count": n }));
            } else {
                println!("{n}");
            }
        }
        DlqCommand::List { group, limit } => {
            let records = bus.dead_letters(&group)?.list(limit).await?;
            print_list(&records, out);
        }
        DlqCommand::Show { group, id, limit } => {
            let dead = bus.dead_letters(&group)?;
            let records = match &id {
                Some(id) => {
                    let all = dead.list(MAX_HELD).await?;
                    let found: Vec<_> = all
                        .into_iter()
                        .filter(|r| r.id.starts_with(id.as_str()))
                        .collect();
                    if found.is_empty() {
                        return Err(Error::invalid_input(format!(
                            "group `{group}` has no dead letter with id `{id}`"
                        )));
                    }
                    found
                }
                None => dead.list(limit).await?,
            };
            for r in &records {
                print_full(r, out);
            }
        }
        DlqCommand::Redrive(args) => {
            return operate(bus, &args.select, args.rate, "redrive", out).await;
        }
        DlqCommand::Purge(args) => {
            if !args.select.dry_run && !args.yes && !confirmed(&args.select)? {
                eprintln!("nothing purged");
                return Ok(ExitCode::from(1));
            }
            return operate(bus, &args.select, None, "purge", out).await;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Ask on the terminal; refuse without one (a script passes --yes).
fn confirmed(select: &Select) -> polybus::Result<bool> {
    if !std::io::stdin().is_terminal() {
        return Err(Error::invalid_input(
            "purge asks for confirmation and stdin is not a terminal: pass --yes",
        ));
    }
    eprint!(
        "purge {} dead letters of group `{}` for good? [y/N] ",
        select
            .limit
            .map_or_else(|| "the selected".to_owned(), |n| format!("up to {n}")),
        select.group
    );
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .map_err(|e| Error::invalid_input(format!("cannot read the answer: {e}")))?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}

/// A redrive or purge, with a progress bar, stopped cleanly by Ctrl-C.
async fn operate(
    bus: &Bus,
    select: &Select,
    rate: Option<u32>,
    verb: &str,
    out: &Out,
) -> polybus::Result<ExitCode> {
    let dead = bus.dead_letters(&select.group)?;
    if select.dry_run {
        return dry_run(&dead, select, verb, out).await;
    }
    let counted = dead.count().await?;
    let bar = if out.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(select.limit.map_or(counted, |n| n.min(counted)))
    };
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({per_sec}, {eta} left)")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_message(format!("{verb} {}", select.group));
    let done = Arc::new(AtomicU64::new(0));
    let mut take = select.take();
    if let Some(r) = rate {
        take = take.rate(r);
    }
    let (b, d) = (bar.clone(), done.clone());
    take = take.on_progress(move |report| {
        d.store(report.done, Ordering::Relaxed);
        b.set_position(report.done);
    });
    let work = async {
        match verb {
            "redrive" => dead.redrive(take).await,
            _ => dead.purge(take).await,
        }
    };
    let report = tokio::select! {
        report = work => report?,
        _ = tokio::signal::ctrl_c() => {
            bar.abandon();
            let n = done.load(Ordering::Relaxed);
            let what = if verb == "redrive" { "redriven" } else { "purged" };
            if out.json {
                out.line(&serde_json::json!({ "group": select.group, "interrupted": true, "done": n }));
            }
            eprintln!(
                "interrupted: {n} {what}; the others stay in the store \
                 (one being {what} when interrupted may be {what} again next time)"
            );
            return Ok(ExitCode::from(130));
        }
    };
    bar.finish_and_clear();
    print_report(&select.group, verb, &report, out);
    Ok(if report.stopped_by.is_some() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

async fn dry_run(
    dead: &DeadLetters,
    select: &Select,
    verb: &str,
    out: &Out,
) -> polybus::Result<ExitCode> {
    let limit = select.limit.map_or(usize::MAX, |n| n as usize);
    let chosen: Vec<DeadLetterRecord> = dead
        .list(MAX_HELD)
        .await?
        .into_iter()
        .filter(|r| select.criteria.matches(r))
        .take(limit)
        .collect();
    if out.json {
        for r in &chosen {
            out.line(&summary(r));
        }
    } else {
        for r in &chosen {
            println!("would {verb} {} ({}): {}", r.id, r.original_topic, r.reason);
        }
        println!(
            "dry run: {} would be {verb}d; nothing was taken",
            chosen.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn print_report(group: &str, verb: &str, report: &DeadLetterReport, out: &Out) {
    let stopped = report.stopped_by.as_ref();
    if out.json {
        out.line(&serde_json::json!({
            "group": group,
            "counted": report.counted,
            "done": report.done,
            "kept": report.kept,
            "stopped_by": stopped.map(|e| serde_json::json!({ "kind": e.kind().name(), "error": e.to_string() })),
        }));
        return;
    }
    let what = if verb == "redrive" {
        "redriven"
    } else {
        "purged"
    };
    println!(
        "{} {what}, {} kept by the filter, of {} counted in `{group}`",
        report.done, report.kept, report.counted
    );
    if let Some(e) = stopped {
        eprintln!("stopped early: {e}");
    }
}

fn summary(r: &DeadLetterRecord) -> serde_json::Value {
    serde_json::json!({
        "id": r.id,
        "original_topic": r.original_topic,
        "group": r.group,
        "reason": r.reason,
        "last_error": r.last_error,
        "attempts": r.attempts,
        "dead_lettered_at_ms": millis(r.dead_lettered_at),
        "redriven_at_ms": millis(r.redriven_at),
        "payload_size": r.payload_size,
        "headers": r.headers,
    })
}

fn print_list(records: &[DeadLetterRecord], out: &Out) {
    if out.json {
        for r in records {
            out.line(&summary(r));
        }
        return;
    }
    if records.is_empty() {
        println!("no dead letters");
        return;
    }
    println!(
        "{:<36}  {:<24}  {:>8}  {:>7}  {:>8}  reason",
        "id", "original topic", "attempts", "bytes", "age"
    );
    for r in records {
        let age = r
            .dead_lettered_at
            .and_then(|t| t.elapsed().ok())
            .map_or_else(|| "?".to_owned(), |d| format!("{}s", d.as_secs()));
        println!(
            "{:<36}  {:<24}  {:>8}  {:>7}  {:>8}  {}",
            r.id, r.original_topic, r.attempts, r.payload_size, age, r.reason
        );
    }
}

fn print_full(r: &DeadLetterRecord, out: &Out) {
    if out.json {
        let mut v = summary(r);
        v["payload"] = String::from_utf8_lossy(r.message.payload())
            .into_owned()
            .into();
        v["key"] = r.message.key().into();
        out.line(&v);
        return;
    }
    println!("id:             {}", r.id);
    println!("original topic: {}", r.original_topic);
    println!("group:          {}", r.group);
    println!("reason:         {}", r.reason);
    if let Some(e) = &r.last_error {
        println!("last error:     {e}");
    }
    println!("attempts:       {}", r.attempts);
    if let Some(ms) = millis(r.dead_lettered_at) {
        println!("dead-lettered:  {ms} ms since the epoch");
    }
    if let Some(k) = r.message.key() {
        println!("key:            {k}");
    }
    for (k, v) in &r.headers {
        println!("header:         {k}: {v}");
    }
    println!("payload ({} bytes):", r.payload_size);
    println!("{}", String::from_utf8_lossy(r.message.payload()));
}
