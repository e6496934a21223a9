//! `chatoy client tail`: a room's recent history, then its live messages, each printed once;
//! the connection resumes from the newest `sent` printed (docs/client-guide.md §4 and §5).

use std::collections::{HashMap, HashSet, VecDeque};

use chatoy_protocol::http::User;
use chatoy_protocol::{Message, MessageContent, ServerFrame, Since, Timestamp};

use super::connection::{connect, next_frame, Backoff, Failure};
use super::http::Http;

/// How many uuids `tail` remembers for de-duplication.
const SEEN_CAPACITY: usize = 100_000;

/// The uuids already printed, the oldest forgotten past [`SEEN_CAPACITY`].
#[derive(Default)]
struct Seen {
    set: HashSet<String>,
    order: VecDeque<String>,
}

impl Seen {
    /// Whether `uuid` is new (and remembers it).
    fn insert(&mut self, uuid: &str) -> bool {
        if self.set.contains(uuid) {
            return false;
        }
        if self.order.len() >= SEEN_CAPACITY {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        self.set.insert(uuid.to_owned());
        self.order.push_back(uuid.to_owned());
        true
    }
}

/// `chatoy client tail`.
pub(super) struct Tail<'a> {
    http: &'a Http,
    token: &'a str,
    room: u64,
    json: bool,
    count: Option<u64>,
    printed: u64,
    seen: Seen,
    /// The greatest `sent` printed: the `since` of the next connection.
    last: Option<Timestamp>,
    /// User id → username, for the text output.
    names: HashMap<u64, String>,
}

impl<'a> Tail<'a> {
    /// A tail of `room`, from `since` if given (else from its recent history).
    pub(super) fn new(
        http: &'a Http,
        token: &'a str,
        room: u64,
        json: bool,
        count: Option<u64>,
        since: Option<Timestamp>,
    ) -> Tail<'a> {
        Tail {
            http,
            token,
            room,
            json,
            count,
            printed: 0,
            seen: Seen::default(),
            last: since,
            names: HashMap::new(),
        }
    }

    pub(super) async fn run(mut self, history: u16) -> anyhow::Result<()> {
        let mut backoff = Backoff::default();
        let mut first = true;
        // Unless --since says where to start: the recent history, whose newest `sent` (printed
        // or not) is where the socket resumes, so nothing sent meanwhile is missed.
        if self.last.is_none() && self.catch_up(history.max(1), usize::from(history)).await? {
            return Ok(());
        }
        loop {
            // Resume per room (docs/client-guide.md §4): this room, from the newest `sent` printed.
            let since = self
                .last
                .map(|last| Since::Rooms(std::collections::BTreeMap::from([(self.room, last)])));
            let mut socket = match connect(self.http, self.token, since).await {
                Ok(socket) => socket,
                Err(Failure::Fatal(err)) => return Err(err),
                Err(Failure::Lost(err, code)) => {
                    if first {
                        // The first connection failing is most likely a wrong URL: say so.
                        return Err(err);
                    }
                    let pause = backoff.next(code);
                    eprintln!("chatoy: {err:#}; reconnecting in {pause:.1?}");
                    tokio::time::sleep(pause).await;
                    continue;
                }
            };
            backoff.reset();
            // Still no resume point: the room was empty when tail started, so whatever it holds
            // now is new. Overlap with the live traffic is de-duplicated.
            if self.last.is_none() && self.catch_up(200, 200).await? {
                let _ = socket.close(None).await;
                return Ok(());
            }
            first = false;
            loop {
                match next_frame(&mut socket).await {
                    Ok(ServerFrame::Recv { data }) if data.room == self.room => {
                        if self.show(data).await? {
                            let _ = socket.close(None).await;
                            return Ok(());
                        }
                    }
                    Ok(_) => {}
                    Err(Failure::Fatal(err)) => return Err(err),
                    Err(Failure::Lost(err, code)) => {
                        let pause = backoff.next(code);
                        eprintln!("chatoy: {err:#}; reconnecting in {pause:.1?}");
                        tokio::time::sleep(pause).await;
                        break;
                    }
                }
            }
        }
    }

    /// Fetches the room's newest `fetch` messages and prints the newest `print` of them not
    /// printed yet, oldest first (the others only count as seen); returns whether `--count` is
    /// reached.
    async fn catch_up(&mut self, fetch: u16, print: usize) -> anyhow::Result<bool> {
        let mut page = self.http.history(self.token, self.room, fetch).await?;
        page.reverse();
        let skip = page.len().saturating_sub(print);
        for (i, message) in page.into_iter().enumerate() {
            if i < skip {
                self.seen.insert(&message.uuid);
                self.last = self.last.max(Some(message.sent));
            } else if self.show(message).await? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Prints a message unless it was printed already; returns whether `--count` is reached.
    async fn show(&mut self, message: Message) -> anyhow::Result<bool> {
        if !self.seen.insert(&message.uuid) {
            return Ok(false);
        }
        self.last = self.last.max(Some(message.sent));
        if self.json {
            println!("{}", serde_json::to_string(&message)?);
        } else {
            let name = self.name(message.sender).await;
            let MessageContent::Text { text } = &message.data;
            println!("{} {name}: {text}", message.sent);
        }
        self.printed += 1;
        Ok(self.count.is_some_and(|count| self.printed >= count))
    }

    /// A sender's username (its id if it cannot be looked up).
    async fn name(&mut self, id: u64) -> String {
        if let Some(name) = self.names.get(&id) {
            return name.clone();
        }
        let path = format!("/users/{id}");
        let name = match self
            .http
            .call::<User>(reqwest::Method::GET, &path, None, None::<&()>)
            .await
        {
            Ok(user) => user.username,
            Err(_) => format!("user{id}"),
        };
        self.names.insert(id, name.clone());
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_forgets_the_oldest() {
        let mut seen = Seen::default();
        assert!(seen.insert("a"));
        assert!(!seen.insert("a"));
        for i in 0..SEEN_CAPACITY {
            seen.insert(&i.to_string());
        }
        assert!(seen.insert("a"), "the oldest was forgotten");
        assert_eq!(seen.set.len(), SEEN_CAPACITY);
    }
}
