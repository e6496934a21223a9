//! `chatoy client`: the terminal client, for scripts and quick checks, and the reference client
//! of docs/client-guide.md. It speaks only the public protocol (docs/PROTOCOL.md): the HTTP API
//! for accounts, rooms and history, and one WebSocket per command for `auth`, `msg` → `send`
//! and `recv`. `send` waits for the ack and resends the same uuid after codes 4 and 5 or a lost
//! connection; `tail` reconnects with jittered backoff and a per-room `since` (its room: the
//! last `sent` it printed), and prints every message once (de-duplicated by uuid).

//!
//! The modules follow a command's data path: `input` (password, token, stdin), `http` (the
//! API), `connection` (the WebSocket: `auth` with `since`, frames, backoff), then the two
//! commands that use a socket, `send` (acks and resends) and `tail` (resume, de-duplication,
//! printing).

mod connection;
mod http;
mod input;
mod send;
mod tail;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use chatoy_protocol::http::{CodeMsg, Credentials, LoginReply, NewRoom, Room, RoomId};
use chatoy_protocol::Timestamp;
use clap::{Args, Subcommand};

use self::http::Http;
use self::input::{password, save_token, stdin_lines, token, token_path};
use self::send::send;
use self::tail::Tail;

/// How long connecting, authenticating or one HTTP call may take.
const NETWORK_TIMEOUT: Duration = Duration::from_secs(15);

/// Flags of `chatoy client`.
#[derive(Debug, Clone, Args)]
pub(crate) struct ClientArgs {
    /// The server (any gateway, or the load balancer in front of them).
    #[arg(
        long,
        env = "CHATOY_URL",
        default_value = "http://127.0.0.1:8080",
        global = true,
        value_name = "URL"
    )]
    url: String,
    /// Where `login` saves the token and other commands read it
    /// [default: $XDG_CONFIG_HOME/chatoy/token or ~/.config/chatoy/token].
    #[arg(long, env = "CHATOY_TOKEN_FILE", global = true, value_name = "PATH")]
    token_file: Option<PathBuf>,
    /// The token to use instead of the token file (best given as the environment variable).
    #[arg(long, env = "CHATOY_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    #[command(subcommand)]
    command: ClientCommand,
}

#[derive(Debug, Clone, Subcommand)]
enum ClientCommand {
    /// Creates an account. The password is $CHATOY_PASSWORD, else the first line of stdin.
    Register {
        /// 3–32 of [A-Za-z0-9_.-].
        username: String,
    },
    /// Logs in and saves the token (or prints it with --print). Password as for `register`.
    Login {
        /// The account.
        username: String,
        /// Print the token on stdout instead of saving it.
        #[arg(long)]
        print: bool,
    },
    /// Revokes the token and forgets it.
    Logout,
    /// Lists the rooms you joined: id, tab, name.
    Rooms,
    /// Creates a room (you join it) and prints its id.
    Create {
        /// The room's name.
        name: String,
        /// Free text.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Joins a room.
    Join {
        /// The room's id.
        room: u64,
    },
    /// Sends a message and waits until the server stored it; prints its uuid and `sent`.
    /// Without TEXT (or with `-`), sends each line of stdin as one message, in order.
    Send {
        /// The room's id.
        room: u64,
        /// The text (words are joined by spaces).
        text: Vec<String>,
        /// The message's uuid (only with one message): running the same command again with the
        /// same uuid never stores it twice.
        #[arg(long)]
        uuid: Option<String>,
        /// Give up (exit status 1) if a message is not stored within this time.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Prints a room's recent history, then its new messages as they come, until interrupted.
    Tail {
        /// The room's id.
        room: u64,
        /// Recent messages to print first.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u16).range(0..=200))]
        history: u16,
        /// Print the messages after this RFC 3339 time instead of the recent history.
        #[arg(long, value_parser = parse_timestamp)]
        since: Option<Timestamp>,
        /// Exit after printing this many messages.
        #[arg(long)]
        count: Option<u64>,
        /// One JSON `Message` per line instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn parse_timestamp(text: &str) -> Result<Timestamp, String> {
    Timestamp::parse(text).ok_or_else(|| "expected an RFC 3339 timestamp".to_owned())
}

/// Runs one client command.
pub(crate) async fn run(args: ClientArgs) -> anyhow::Result<()> {
    let http = Http::new(&args.url)?;
    match &args.command {
        ClientCommand::Register { username } => {
            let password = password()?;
            let body = Credentials {
                username: username.clone(),
                password,
            };
            http.call::<CodeMsg>(reqwest::Method::POST, "/users", None, Some(&body))
                .await?;
            println!("registered {username}");
        }
        ClientCommand::Login { username, print } => {
            let password = password()?;
            let body = Credentials {
                username: username.clone(),
                password,
            };
            let reply: LoginReply = http
                .call(reqwest::Method::POST, "/login", None, Some(&body))
                .await?;
            let user = reply.user.context("the login answer names no user")?;
            if *print {
                println!("{}", reply.msg);
            } else {
                let path = token_path(&args)?;
                save_token(&path, &reply.msg)?;
                println!(
                    "logged in as {} (user {}); token saved in {}",
                    user.username,
                    user.id,
                    path.display()
                );
            }
        }
        ClientCommand::Logout => {
            let token = token(&args)?;
            http.call::<CodeMsg>(reqwest::Method::POST, "/logout", Some(&token), None::<&()>)
                .await?;
            if args.token.is_none() {
                let path = token_path(&args)?;
                std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
            }
            println!("logged out");
        }
        ClientCommand::Rooms => {
            let token = token(&args)?;
            let rooms: Vec<Room> = http
                .call(reqwest::Method::GET, "/rooms/me", Some(&token), None::<&()>)
                .await?;
            for room in rooms {
                println!("{}\t{}", room.id, room.name);
            }
        }
        ClientCommand::Create { name, description } => {
            let token = token(&args)?;
            let body = NewRoom {
                name: name.clone(),
                description: description.clone(),
            };
            let room: RoomId = http
                .call(reqwest::Method::POST, "/rooms", Some(&token), Some(&body))
                .await?;
            println!("{}", room.id);
        }
        ClientCommand::Join { room } => {
            let token = token(&args)?;
            let path = format!("/rooms/{room}/join");
            http.call::<CodeMsg>(reqwest::Method::POST, &path, Some(&token), None::<&()>)
                .await?;
            println!("joined room {room}");
        }
        ClientCommand::Send {
            room,
            text,
            uuid,
            timeout,
        } => {
            let token = token(&args)?;
            let texts = if text.is_empty() || text == &["-"] {
                stdin_lines()?
            } else {
                vec![text.join(" ")]
            };
            if uuid.is_some() && texts.len() != 1 {
                bail!("--uuid names one message, but there are {}", texts.len());
            }
            let messages = texts
                .into_iter()
                .map(|text| {
                    (
                        uuid.clone().unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
                        text,
                    )
                })
                .collect();
            send(&http, &token, *room, messages, *timeout).await?;
        }
        ClientCommand::Tail {
            room,
            history,
            since,
            count,
            json,
        } => {
            let token = token(&args)?;
            let tail = Tail::new(&http, &token, *room, *json, *count, *since);
            tail.run(*history).await?;
        }
    }
    Ok(())
}
