//! `herald-loadtest faultproxy` through real sockets: an echo server behind
//! it, faults switched on and off through its control port, and what a
//! client sees of each.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Proxy {
    child: Child,
    listen: SocketAddr,
    control: TcpStream,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proxy {
    fn ctl(&mut self, line: &str) -> String {
        writeln!(self.control, "{line}").unwrap();
        let mut reply = String::new();
        BufReader::new(&self.control).read_line(&mut reply).unwrap();
        assert!(reply.starts_with("ok "), "{line}: {reply}");
        reply
    }
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// An echo server on its own thread, one thread per connection.
fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

fn start(upstream: SocketAddr) -> Proxy {
    let (listen, control) = (free_addr(), free_addr());
    let child = Command::new(env!("CARGO_BIN_EXE_herald-loadtest"))
        .args(["faultproxy", "--listen", &listen.to_string()])
        .args([
            "--upstream",
            &upstream.to_string(),
            "--control",
            &control.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let control = loop {
        match TcpStream::connect(control) {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("faultproxy's control port never opened: {e}"),
        }
    };
    control
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    Proxy {
        child,
        listen,
        control,
    }
}

fn client(p: &Proxy) -> TcpStream {
    let c = TcpStream::connect(p.listen).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c
}

/// Sends `msg` and reads its echo; the round trip's duration.
fn round_trip(c: &mut TcpStream, msg: &[u8]) -> std::io::Result<Duration> {
    let t = Instant::now();
    c.write_all(msg)?;
    let mut got = vec![0u8; msg.len()];
    c.read_exact(&mut got)?;
    assert_eq!(got, msg);
    Ok(t.elapsed())
}

#[test]
fn faults_apply_to_live_connections_and_clear() {
    let mut p = start(echo_server());
    let mut c = client(&p);
    round_trip(&mut c, b"hello").unwrap();

    // Latency one way only still delays every round trip by it.
    p.ctl("latency up 150");
    let slow = round_trip(&mut c, b"slow").unwrap();
    assert!(slow >= Duration::from_millis(150), "{slow:?}");
    p.ctl("clear");

    // 2000 bytes at 4000 bytes a second each way: the writer sends a chunk
    // and then waits out its share (0.5 s), so the next message waits
    // (the two directions wait at the same time).
    p.ctl("bandwidth both 4000");
    let t = round_trip(&mut c, &[7u8; 2000]).unwrap() + round_trip(&mut c, b"x").unwrap();
    assert!(t >= Duration::from_millis(450), "{t:?}");
    p.ctl("clear");

    // Half-open: nothing comes back, yet the socket stays open; ending it
    // resets the stuck connection, and a new one flows.
    p.ctl("halfopen on");
    c.set_read_timeout(Some(Duration::from_millis(400)))
        .unwrap();
    c.write_all(b"stuck").unwrap();
    let mut buf = [0u8; 16];
    let e = c.read(&mut buf).unwrap_err();
    assert!(
        matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "{e:?}"
    );
    p.ctl("halfopen off");
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let e = c.read(&mut buf).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e:?}");
    let mut c = client(&p);
    round_trip(&mut c, b"again").unwrap();

    // `reset` ends every open connection with RST, at once.
    p.ctl("reset");
    let e = round_trip(&mut c, b"gone").unwrap_err();
    assert!(
        matches!(
            e.kind(),
            ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::UnexpectedEof
        ),
        "{e:?}"
    );

    // A reset probability of 1 resets a connection at its first chunk.
    p.ctl("reset-prob 1");
    // The far side is reset too, at once: a connection reset one way and
    // left open the other would be a black hole, not a reset.
    let mut c = client(&p);
    let t = Instant::now();
    let e = round_trip(&mut c, b"first").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    let status = p.ctl("status");
    assert!(status.contains("reset_prob=1"), "{status}");
    assert!(!status.contains("resets=0 "), "{status}");
}
