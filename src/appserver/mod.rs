//! Application-server tools: what a site's backend needs to use a push
//! service. The library parts (`encrypt`, `vapid_sign`, `subscription`,
//! `send`, `receipt`) are shared by `herald send`, `herald demo` and the
//! tests.

pub mod encrypt;
pub mod receipt;
pub mod send;
pub mod vapid_sign;

pub use encrypt::encrypt_aes128gcm;
pub use receipt::{wait_for_receipt, Receipt, ReceiptTimeout};
pub use send::{send_push, PushOptions, PushResponse, PushServiceError, Vapid};
pub use vapid_sign::VapidKey;

use anyhow::Context;
use herald_proto::subscription::Subscription;
use herald_proto::urgency::Urgency;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// `--urgency`: exactly the four RFC 8030 spellings, listed in `--help` as
/// the possible values (herald-proto's `Urgency` knows no clap).
fn urgency_parser() -> impl clap::builder::TypedValueParser<Value = Urgency> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(Urgency::ALL.map(Urgency::as_str))
        .try_map(|s| s.parse::<Urgency>())
}

#[derive(clap::Subcommand, Debug)]
pub enum VapidCommand {
    /// Make a new P-256 VAPID key pair.
    ///
    /// With --out FILE, the private key is written to FILE as PKCS#8 PEM
    /// (mode 0600, never over an existing file unless --force) and stdout
    /// gets only the public key, so `KEY=$(herald vapid generate --out k.pem)`
    /// works. Without --out, stdout gets the PEM (`herald vapid generate >
    /// k.pem`) and the public key goes to stderr.
    ///
    /// The public key is printed as base64url without padding of the 65-byte
    /// uncompressed point: the `applicationServerKey` a page passes to
    /// `pushManager.subscribe()`.
    Generate {
        /// Write the private key (PKCS#8 PEM) to this file.
        #[arg(long, short, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Replace FILE if it exists.
        #[arg(long, requires = "out")]
        force: bool,
    },
    /// Print the public key (`applicationServerKey`) of a private key file.
    ///
    /// Reads PKCS#8 PEM ("BEGIN PRIVATE KEY"), SEC1 PEM ("BEGIN EC PRIVATE
    /// KEY") or a raw base64url 32-byte private key.
    Show {
        /// The private key file.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

/// Exit statuses of `herald send --receipt`, one per outcome, so scripts
/// can branch on what became of the message without parsing output.
pub mod exit {
    pub const DELIVERED: u8 = 0;
    /// The push was refused, or the receipt could not be read.
    pub const FAILED: u8 = 1;
    pub const REJECTED: u8 = 3;
    pub const EXPIRED: u8 = 4;
    pub const CANCELLED: u8 = 5;
    pub const GONE: u8 = 6;
    pub const NO_RECEIPT: u8 = 7;
}

const SEND_AFTER_HELP: &str = "\
Exit status:
  0  the push service accepted the message (with --receipt: it was delivered,
     or, for a mobile user agent, forwarded to FCM/APNs)
  1  the push service refused it (status, errno and message on stderr), or it
     could not be sent, or its receipt could not be read
  2  bad command line
With --receipt, for messages that were not delivered:
  3  rejected: the user agent refused it (the line shows its code, e.g. 302)
  4  expired: its TTL ran out before the user agent came online
  5  cancelled: it was deleted (DELETE on its Location)
  6  gone: the subscription was removed
  7  no receipt within --receipt-timeout";

/// Send one push message to a subscription, as an application server would.
///
/// The payload is encrypted with RFC 8291 `aes128gcm` to the subscription's
/// keys and, with --vapid-key, the request is signed with a VAPID (RFC 8292)
/// token for the endpoint's origin. Works with any RFC 8030 push service
/// reachable over http://.
///
/// Prints the HTTP status and the message's Location and, with --receipt,
/// the receipt subscription and then the message's outcome. The exit
/// status (listed after the options) says whether the service accepted
/// the message and, with --receipt, what became of it.
#[derive(clap::Args, Debug)]
#[command(after_help = SEND_AFTER_HELP)]
pub struct SendArgs {
    /// The subscription as `PushSubscription.toJSON()` gives it:
    /// `{"endpoint": "...", "keys": {"p256dh": "...", "auth": "..."}}`.
    /// Either the JSON itself (anything starting with `{`) or a file holding it.
    #[arg(long, short = 's', value_name = "FILE_OR_JSON")]
    pub subscription: String,

    /// VAPID private key file (PEM as written by `herald vapid generate`).
    /// Without it the request carries no Authorization header.
    #[arg(long, value_name = "FILE", env = "HERALD_VAPID_KEY")]
    pub vapid_key: Option<PathBuf>,

    /// Contact for the push service's operator, put in the VAPID `sub` claim:
    /// mailto:you@example.com or https://example.com/contact.
    /// Ignored without --vapid-key.
    #[arg(long, value_name = "URI", env = "HERALD_VAPID_SUBJECT")]
    pub subject: Option<String>,

    /// Also trust the CA certificates in this PEM file for https://
    /// endpoints and receipt subscriptions (for a push service with a
    /// private or self-signed certificate). The public roots are always
    /// trusted.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,

    /// Seconds the push service should keep the message while the browser
    /// is offline (the TTL header); 0 means deliver now or drop.
    #[arg(long, value_name = "SECONDS", default_value_t = send::DEFAULT_TTL)]
    pub ttl: u32,

    /// Message urgency (Urgency header).
    #[arg(long, value_parser = urgency_parser())]
    pub urgency: Option<Urgency>,

    /// Replace any undelivered message with the same topic (Topic header;
    /// up to 32 characters of A-Z a-z 0-9 - _).
    #[arg(long)]
    pub topic: Option<String>,

    /// Payload text. Without --data or --data-file the message has no payload.
    #[arg(long, conflicts_with = "data_file")]
    pub data: Option<String>,

    /// Read the payload from a file; `-` reads standard input.
    #[arg(long, value_name = "FILE")]
    pub data_file: Option<PathBuf>,

    /// Give up when the push service has not answered after this many seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub timeout: u64,

    /// Ask for a delivery receipt (RFC 8030 `Prefer: respond-async`), print
    /// the receipt subscription URL, then wait for the message's outcome
    /// (delivered, rejected, expired, cancelled or gone) and print it. The
    /// exit status tells the outcome (below).
    #[arg(long)]
    pub receipt: bool,

    /// Report the receipt to this receipt subscription, printed by an
    /// earlier `--receipt`, instead of a new one, so one URL collects the
    /// receipts of many messages. Implies --receipt.
    #[arg(long, value_name = "URL")]
    pub receipt_subscription: Option<String>,

    /// With --receipt: how many seconds to wait for the receipt.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub receipt_timeout: u64,
}

pub fn run_vapid(cmd: VapidCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        VapidCommand::Generate { out, force } => {
            let key = VapidKey::generate();
            let pem = key.to_pkcs8_pem()?;
            match out {
                Some(path) => {
                    write_private_file(&path, pem.as_bytes(), force)?;
                    println!("{}", key.public_key_b64());
                }
                None => {
                    print!("{pem}");
                    eprintln!("public key: {}", key.public_key_b64());
                }
            }
        }
        VapidCommand::Show { file } => {
            let key = VapidKey::from_file(&file)?;
            println!("{}", key.public_key_b64());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes a private key readable only by its owner.
pub(crate) fn write_private_file(path: &Path, contents: &[u8], force: bool) -> anyhow::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            anyhow::anyhow!(
                "{} already exists; pass --force to replace it",
                path.display()
            )
        } else {
            anyhow::Error::new(e).context(format!("cannot create {}", path.display()))
        }
    })?;
    file.write_all(contents)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

pub fn run_send(args: SendArgs) -> anyhow::Result<ExitCode> {
    let subscription = Subscription::from_arg(&args.subscription)?;
    let vapid = match &args.vapid_key {
        Some(path) => {
            if let Some(subject) = &args.subject {
                vapid_sign::validate_subject(subject)?;
            }
            Some(Vapid {
                key: VapidKey::from_file(path)?,
                subject: args.subject.clone(),
            })
        }
        None => {
            if args.subject.is_some() {
                eprintln!("herald send: warning: no --vapid-key, so the request is unsigned and --subject is unused");
            }
            None
        }
    };
    if let Some(topic) = &args.topic {
        send::validate_topic(topic)?;
    }
    let payload = read_payload(&args)?;
    if let Some(p) = &payload {
        if p.len() > encrypt::MAX_PORTABLE_PLAINTEXT {
            eprintln!(
                "herald send: warning: the payload is {} bytes of plaintext; push services only have to accept {}",
                p.len(),
                herald_proto::crypto::body_limit_explained(herald_proto::crypto::PORTABLE_BODY)
            );
        }
    }
    let options = PushOptions {
        ttl: args.ttl,
        urgency: args.urgency,
        topic: args.topic.clone(),
        timeout: Duration::from_secs(args.timeout.max(1)),
        receipt: args.receipt || args.receipt_subscription.is_some(),
        receipt_subscription: args.receipt_subscription.clone(),
        client: herald_client::http::HttpClient::new(args.ca.as_deref())?,
    };

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let response = runtime.block_on(send_push(
        &subscription,
        payload.as_deref(),
        vapid.as_ref(),
        &options,
    ))?;

    println!("{}", response.status);
    if let Some(location) = &response.location {
        println!("Location: {location}");
    }
    if let Some(ttl) = response.ttl {
        println!("TTL: {ttl}");
    }
    if !response.is_success() {
        eprintln!("herald send: {}", response.describe_error());
        return Ok(ExitCode::FAILURE);
    }
    if !options.receipt {
        return Ok(ExitCode::SUCCESS);
    }
    // A service may leave the Link out when the subscription passed in is
    // the one it used; one that answers 201 ignored the request.
    let subscription_url = response.receipt_subscription.clone().or_else(|| {
        (response.status == http::StatusCode::ACCEPTED)
            .then(|| args.receipt_subscription.clone())
            .flatten()
    });
    let Some(subscription_url) = subscription_url else {
        eprintln!(
            "herald send: the push service accepted the message but offers no receipt \
             (it answered {} without a Link rel=\"{}\")",
            response.status,
            send::RECEIPT_REL
        );
        return Ok(ExitCode::from(exit::FAILED));
    };
    println!("Receipt subscription: {subscription_url}");
    let Some(location) = &response.location else {
        eprintln!(
            "herald send: the push service gave no Location, so its receipt cannot be told apart"
        );
        return Ok(ExitCode::from(exit::FAILED));
    };
    let timeout = Duration::from_secs(args.receipt_timeout);
    let waited = runtime.block_on(wait_for_receipt(
        &options.client,
        &subscription_url,
        location,
        timeout,
    ));
    let receipt = match waited {
        Ok(receipt) => receipt,
        Err(e) if e.downcast_ref::<ReceiptTimeout>().is_some() => {
            let state = runtime.block_on(receipt::message_state(
                &options.client,
                location,
                Duration::from_secs(5),
            ));
            match state {
                Ok(state) => eprintln!("herald send: {e:#}; the message is {state}"),
                Err(why) => eprintln!("herald send: {e:#}; its state is unknown: {why:#}"),
            }
            return Ok(ExitCode::from(exit::NO_RECEIPT));
        }
        Err(e) => {
            eprintln!("herald send: {e:#}");
            return Ok(ExitCode::from(exit::FAILED));
        }
    };
    println!("receipt: {}", receipt.describe());
    Ok(ExitCode::from(match receipt.outcome {
        receipt::Outcome::Delivered | receipt::Outcome::Forwarded => exit::DELIVERED,
        receipt::Outcome::Rejected => exit::REJECTED,
        receipt::Outcome::Expired => exit::EXPIRED,
        receipt::Outcome::Cancelled => exit::CANCELLED,
        receipt::Outcome::Gone => exit::GONE,
        receipt::Outcome::Other(_) => exit::FAILED,
    }))
}

fn read_payload(args: &SendArgs) -> anyhow::Result<Option<Vec<u8>>> {
    if let Some(text) = &args.data {
        return Ok(Some(text.as_bytes().to_vec()));
    }
    let Some(path) = &args.data_file else {
        return Ok(None);
    };
    if path.as_os_str() == "-" {
        let mut data = Vec::new();
        std::io::stdin()
            .read_to_end(&mut data)
            .context("cannot read the payload from standard input")?;
        return Ok(Some(data));
    }
    let data = std::fs::read(path)
        .with_context(|| format!("cannot read payload file {}", path.display()))?;
    Ok(Some(data))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(clap::Parser)]
    struct Send {
        #[command(flatten)]
        args: SendArgs,
    }

    /// `--urgency` takes exactly the header's four spellings, and `--help`
    /// lists them, as when `Urgency` derived clap's `ValueEnum`.
    #[test]
    fn urgency_option_takes_exactly_the_four_spellings() {
        let parse = |u: &str| Send::try_parse_from(["send", "-s", "{}", "--urgency", u]);
        for u in Urgency::ALL {
            assert_eq!(parse(u.as_str()).unwrap().args.urgency, Some(u));
        }
        for bad in ["HIGH", " high", "urgent", ""] {
            let err = parse(bad).err().expect(bad).to_string();
            assert!(
                err.contains("[possible values: very-low, low, normal, high]"),
                "{err}"
            );
        }
        let help = Send::command().render_help().to_string();
        assert!(
            help.contains("[possible values: very-low, low, normal, high]"),
            "{help}"
        );
    }

    #[test]
    fn private_key_file_is_owner_only_and_not_clobbered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pem");
        write_private_file(&path, b"one", false).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let err = write_private_file(&path, b"two", false).unwrap_err();
        assert!(err.to_string().contains("--force"));
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
        write_private_file(&path, b"two", true).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
    }
}
