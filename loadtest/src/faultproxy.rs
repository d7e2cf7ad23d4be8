//! A TCP proxy that injects faults on command, for the chaos runs
//! (scripts/chaos.sh): the kernel here has no `netem`, so slow, lossy and
//! stuck links between Herald nodes and Redis come from this.
//!
//! Every accepted connection opens one to the upstream and forwards bytes
//! both ways. The faults apply to all connections at once, current and new,
//! and change at run time through the control address, one command per
//! line, each answered with one line (`ok …` or `err …`):
//!
//! ```text
//! latency up|down|both MS     delay every chunk by MS (up = client → upstream)
//! bandwidth up|down|both B    at most B bytes a second (0: unlimited)
//! reset-prob P                reset the connection with probability P per chunk
//! reset                       reset every open connection now (RST both sides)
//! halfopen on|off             stop forwarding both ways, keep the sockets open;
//!                             `off` resets the stuck ones (their peer's state is
//!                             gone in the fault this stands for) and new
//!                             connections flow again
//! clear                       no faults (like `halfopen off` for stuck ones)
//! status                      the faults and counters
//! ```

use anyhow::{bail, Context, Result};
use clap::Args;
use rand::{Rng, SeedableRng};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

#[derive(Args)]
pub struct FaultProxyArgs {
    /// Address clients connect to.
    #[arg(long)]
    listen: SocketAddr,
    /// Address every connection is forwarded to.
    #[arg(long)]
    upstream: SocketAddr,
    /// Address of the line-protocol control port (see the module's doc).
    #[arg(long)]
    control: SocketAddr,
    /// Seed of the random resets, so a run can be repeated.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// Which way bytes travel: `Up` from the client to the upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    Up,
    Down,
}

#[derive(Clone, Debug, Default, PartialEq)]
struct Faults {
    latency: [Duration; 2],
    /// Bytes a second; 0 is unlimited.
    bandwidth: [u64; 2],
    reset_prob: f64,
    halfopen: bool,
    /// Bumped by `reset`: a connection opened under an older epoch resets.
    epoch: u64,
    /// Bumped when half-open ends: connections stuck under an older one reset.
    unstick: u64,
}

#[derive(Debug, PartialEq)]
enum Command {
    Latency(Vec<Dir>, Duration),
    Bandwidth(Vec<Dir>, u64),
    ResetProb(f64),
    Reset,
    HalfOpen(bool),
    Clear,
    Status,
}

fn dirs(word: &str) -> Result<Vec<Dir>> {
    Ok(match word {
        "up" => vec![Dir::Up],
        "down" => vec![Dir::Down],
        "both" => vec![Dir::Up, Dir::Down],
        other => bail!("direction must be up, down or both, not {other:?}"),
    })
}

fn parse_command(line: &str) -> Result<Command> {
    let words: Vec<&str> = line.split_whitespace().collect();
    Ok(match words.as_slice() {
        ["latency", d, ms] => Command::Latency(
            dirs(d)?,
            Duration::from_millis(ms.parse().context("latency is whole milliseconds")?),
        ),
        ["bandwidth", d, b] => {
            Command::Bandwidth(dirs(d)?, b.parse().context("bandwidth is bytes a second")?)
        }
        ["reset-prob", p] => {
            let p: f64 = p.parse().context("reset-prob is a number")?;
            if !(0.0..=1.0).contains(&p) {
                bail!("reset-prob must be within 0..1");
            }
            Command::ResetProb(p)
        }
        ["reset"] => Command::Reset,
        ["halfopen", "on"] => Command::HalfOpen(true),
        ["halfopen", "off"] => Command::HalfOpen(false),
        ["clear"] => Command::Clear,
        ["status"] => Command::Status,
        _ => bail!("unknown command {line:?}"),
    })
}

impl Faults {
    fn apply(&mut self, cmd: &Command) {
        match cmd {
            Command::Latency(ds, d) => ds.iter().for_each(|x| self.latency[*x as usize] = *d),
            Command::Bandwidth(ds, b) => ds.iter().for_each(|x| self.bandwidth[*x as usize] = *b),
            Command::ResetProb(p) => self.reset_prob = *p,
            Command::Reset => self.epoch += 1,
            Command::HalfOpen(on) => {
                if self.halfopen && !on {
                    self.unstick += 1;
                }
                self.halfopen = *on;
            }
            Command::Clear => {
                let (epoch, unstick) = (self.epoch, self.unstick + u64::from(self.halfopen));
                *self = Faults {
                    epoch,
                    unstick,
                    ..Faults::default()
                };
            }
            Command::Status => {}
        }
    }

    fn describe(&self) -> String {
        format!(
            "latency_up_ms={} latency_down_ms={} bandwidth_up={} bandwidth_down={} reset_prob={} halfopen={}",
            self.latency[0].as_millis(),
            self.latency[1].as_millis(),
            self.bandwidth[0],
            self.bandwidth[1],
            self.reset_prob,
            self.halfopen
        )
    }
}

/// How long sending `bytes` takes at `rate` bytes a second (0: no limit).
fn pace(bytes: usize, rate: u64) -> Duration {
    if rate == 0 {
        return Duration::ZERO;
    }
    Duration::from_secs_f64(bytes as f64 / rate as f64)
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    open: AtomicU64,
    resets: AtomicU64,
    bytes: [AtomicU64; 2],
}

pub async fn run(args: FaultProxyArgs) -> Result<()> {
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let control = TcpListener::bind(args.control)
        .await
        .with_context(|| format!("binding {}", args.control))?;
    let (tx, rx) = watch::channel(Faults::default());
    let counters = Arc::new(Counters::default());
    eprintln!(
        "faultproxy: {} -> {}, control on {}",
        args.listen, args.upstream, args.control
    );
    tokio::spawn(serve_control(control, tx, counters.clone()));
    let mut seed = args.seed;
    loop {
        let (client, _) = match listener.accept().await {
            Ok(c) => c,
            // Out of files and the like: the proxy must outlive it.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        seed = seed.wrapping_add(1);
        let (rx, counters) = (rx.clone(), counters.clone());
        tokio::spawn(async move {
            counters.accepted.fetch_add(1, Ordering::Relaxed);
            counters.open.fetch_add(1, Ordering::Relaxed);
            connection(client, args.upstream, rx, &counters, seed).await;
            counters.open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

async fn serve_control(
    listener: TcpListener,
    faults: watch::Sender<Faults>,
    counters: Arc<Counters>,
) {
    let faults = Arc::new(faults);
    while let Ok((sock, _)) = listener.accept().await {
        let (faults, counters) = (faults.clone(), counters.clone());
        tokio::spawn(async move {
            let (r, mut w) = sock.into_split();
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let reply = match parse_command(&line) {
                    Ok(cmd) => {
                        faults.send_modify(|f| f.apply(&cmd));
                        let c = &counters;
                        format!(
                            "ok {} accepted={} open={} resets={} bytes_up={} bytes_down={}\n",
                            faults.borrow().describe(),
                            c.accepted.load(Ordering::Relaxed),
                            c.open.load(Ordering::Relaxed),
                            c.resets.load(Ordering::Relaxed),
                            c.bytes[0].load(Ordering::Relaxed),
                            c.bytes[1].load(Ordering::Relaxed),
                        )
                    }
                    Err(e) => format!("err {e:#}\n"),
                };
                if w.write_all(reply.as_bytes()).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// Why a connection ended: a reset closes both sockets with RST, so each
/// side sees what a dropped link or a crashed peer shows it.
enum End {
    Closed,
    Reset,
}

async fn connection(
    client: TcpStream,
    upstream: SocketAddr,
    faults: watch::Receiver<Faults>,
    counters: &Counters,
    seed: u64,
) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        let _ = client.set_zero_linger();
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let (epoch, unstick) = {
        let f = faults.borrow();
        (f.epoch, f.unstick)
    };
    let end = {
        let up = pump(&mut cr, &mut sw, Dir::Up, faults.clone(), counters, seed);
        let down = pump(&mut sr, &mut cw, Dir::Down, faults.clone(), counters, !seed);
        // A reset in either direction ends both at once; a clean end of one
        // direction waits for the other (a half-close, as TCP allows).
        let both = async {
            tokio::pin!(up, down);
            tokio::select! {
                a = &mut up => match a {
                    End::Reset => End::Reset,
                    End::Closed => down.await,
                },
                b = &mut down => match b {
                    End::Reset => End::Reset,
                    End::Closed => up.await,
                },
            }
        };
        tokio::select! {
            e = both => e,
            () = reset_ordered(faults, epoch, unstick) => End::Reset,
        }
    };
    if matches!(end, End::Reset) {
        counters.resets.fetch_add(1, Ordering::Relaxed);
        // Whole again first: a write half dropped on its own sends FIN,
        // and the peer would read a clean end before the RST.
        for (r, w) in [(cr, cw), (sr, sw)] {
            if let Ok(s) = r.reunite(w) {
                let _ = s.set_zero_linger();
            }
        }
    }
}

/// Returns once `reset` was commanded after the connection opened, or once
/// half-open ended while the connection was stuck in it.
async fn reset_ordered(mut faults: watch::Receiver<Faults>, epoch: u64, unstick: u64) {
    loop {
        {
            let f = faults.borrow_and_update();
            if f.epoch != epoch || f.unstick != unstick {
                return;
            }
        }
        if faults.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

async fn wait_not_halfopen(faults: &mut watch::Receiver<Faults>) {
    while faults.borrow_and_update().halfopen {
        if faults.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// One direction: a reader stamps each chunk with its arrival, the writer
/// sends it once the direction's latency has passed, then waits out the
/// bandwidth's share of it. The channel between them is what lets later
/// chunks arrive while earlier ones wait, as on a long link.
async fn pump(
    from: &mut OwnedReadHalf,
    to: &mut OwnedWriteHalf,
    dir: Dir,
    faults: watch::Receiver<Faults>,
    counters: &Counters,
    seed: u64,
) -> End {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(64);
    let mut rf = faults.clone();
    let reader = async move {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            wait_not_halfopen(&mut rf).await;
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return End::Closed,
                Ok(n) => n,
            };
            let p = rf.borrow().reset_prob;
            if p > 0.0 && rng.gen_bool(p) {
                return End::Reset;
            }
            if tx.send((Instant::now(), buf[..n].to_vec())).await.is_err() {
                return End::Closed;
            }
        }
    };
    let mut wf = faults;
    let writer = async move {
        while let Some((at, chunk)) = rx.recv().await {
            let (latency, rate) = {
                let f = wf.borrow();
                (f.latency[dir as usize], f.bandwidth[dir as usize])
            };
            tokio::time::sleep_until(at + latency).await;
            wait_not_halfopen(&mut wf).await;
            if to.write_all(&chunk).await.is_err() {
                return End::Closed;
            }
            counters.bytes[dir as usize].fetch_add(chunk.len() as u64, Ordering::Relaxed);
            tokio::time::sleep(pace(chunk.len(), rate)).await;
        }
        // The reader saw EOF: pass the half-close on.
        let _ = to.shutdown().await;
        End::Closed
    };
    tokio::pin!(reader, writer);
    tokio::select! {
        // A reset is at once; an end of stream still lets the writer send
        // what is queued.
        r = &mut reader => match r {
            End::Reset => End::Reset,
            End::Closed => writer.await,
        },
        w = &mut writer => w,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_and_bad_ones_are_refused() {
        assert_eq!(
            parse_command("latency both 150").unwrap(),
            Command::Latency(vec![Dir::Up, Dir::Down], Duration::from_millis(150))
        );
        assert_eq!(
            parse_command("bandwidth down 1000").unwrap(),
            Command::Bandwidth(vec![Dir::Down], 1000)
        );
        assert_eq!(parse_command(" reset ").unwrap(), Command::Reset);
        assert_eq!(
            parse_command("reset-prob 0.25").unwrap(),
            Command::ResetProb(0.25)
        );
        assert_eq!(
            parse_command("halfopen on").unwrap(),
            Command::HalfOpen(true)
        );
        for bad in [
            "latency sideways 5",
            "latency up -1",
            "reset-prob 2",
            "halfopen",
            "",
            "nap",
        ] {
            assert!(parse_command(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn faults_change_as_commanded_and_clear_keeps_the_epochs() {
        let mut f = Faults::default();
        f.apply(&parse_command("latency up 20").unwrap());
        f.apply(&parse_command("bandwidth both 500").unwrap());
        assert_eq!(f.latency, [Duration::from_millis(20), Duration::ZERO]);
        assert_eq!(f.bandwidth, [500, 500]);
        f.apply(&Command::Reset);
        f.apply(&Command::HalfOpen(true));
        assert_eq!((f.epoch, f.unstick), (1, 0));
        // Leaving half-open unsticks, whether by `halfopen off` or `clear`.
        f.apply(&Command::Clear);
        assert_eq!(
            f,
            Faults {
                epoch: 1,
                unstick: 1,
                ..Faults::default()
            }
        );
        f.apply(&Command::HalfOpen(true));
        f.apply(&Command::HalfOpen(false));
        assert_eq!(f.unstick, 2);
        // Turning it off twice is not two ends.
        f.apply(&Command::HalfOpen(false));
        assert_eq!(f.unstick, 2);
    }

    #[test]
    fn pace_is_the_bytes_share_of_a_second() {
        assert_eq!(pace(1000, 0), Duration::ZERO);
        assert_eq!(pace(500, 1000), Duration::from_millis(500));
        assert_eq!(pace(3, 2), Duration::from_millis(1500));
    }
}
