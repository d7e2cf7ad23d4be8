//! The `herald` command: the push service itself (`serve`) and the tools an
//! application server needs to use it (`vapid`, `send`, `demo`).

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Why not glibc's malloc: a push allocates and frees many short-lived
/// buffers of a few hundred bytes to a few KiB (request bodies, encoded
/// messages, frames). glibc's malloc and free were a sixth of a cluster
/// node's profile (its free lists merged and split again), jemalloc's about
/// 3%: 5-12% less CPU per push on a cluster node at a fixed rate (none
/// measurable on one node), with the same RSS per idle connection at
/// 15,000 (README, "The CPU of one push").
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "herald",
    version,
    about = "Herald, a Web Push service (Mozilla push websocket protocol, RFC 8030, RFC 8291, RFC 8292)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the push service: the user-agent websocket and the application-server HTTP API.
    Serve(herald::config::ServeArgs),
    /// Make or inspect VAPID key pairs for application servers.
    #[command(subcommand)]
    Vapid(herald::appserver::VapidCommand),
    /// Send one push message to a subscription, as an application server would.
    Send(herald::appserver::SendArgs),
    /// Serve a demo page and application server that use a Herald.
    Demo(herald::demo::DemoArgs),
    /// Print a new random endpoint key (for `endpoint_keys`, shared by every node).
    Keygen,
    /// Set or list broadcast versions through a running Herald's API.
    #[command(subcommand)]
    Broadcast(herald::broadcast::cli::BroadcastCommand),
    /// Look up, drop and block through a running Herald's admin API.
    #[command(subcommand)]
    Admin(herald::admin::cli::AdminCommand),
    /// Receive pushes on this machine: subscribe, then print or handle each message.
    Listen(herald::listen::ListenArgs),
    /// Back up a running Herald's store through its admin API (a consistent copy, taken while serving).
    Backup(herald::backup::cli::BackupArgs),
    /// Restore a backup into a data directory, for a Herald started on it afterwards.
    Restore(herald::backup::cli::RestoreArgs),
    /// Take over another push service's stored user agents, subscriptions and messages.
    #[command(subcommand)]
    Import(herald::import::ImportCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => herald::server::run_from_args(args),
        Command::Vapid(cmd) => herald::appserver::run_vapid(cmd),
        Command::Send(args) => herald::appserver::run_send(args),
        Command::Demo(args) => herald::demo::run(args),
        Command::Broadcast(cmd) => herald::broadcast::cli::run(cmd),
        Command::Admin(cmd) => herald::admin::cli::run(cmd),
        Command::Listen(args) => herald::listen::run(args),
        Command::Import(cmd) => herald::import::run(cmd),
        Command::Backup(args) => herald::backup::cli::run_backup(args),
        Command::Restore(args) => herald::backup::cli::run_restore(args),
        Command::Keygen => {
            println!("{}", herald::token::generate_key());
            Ok(ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("herald: {e:#}");
            ExitCode::FAILURE
        }
    }
}
