//! Each client command: its flags, the request it builds, and how it prints
//! the answer. State names are taken without their prefix and in any case
//! (`registered`, `NOT_FOUND`, `not-found`, `CONNECTION_STATE_IGNORED`).

use super::Failure;
use super::client::{ClientOpts, Clients};
use super::render::{self, Output, connection_row, short, state, table};
use crate::pb::tether::v1 as pb;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// Options every client command takes.
#[derive(Clone, Debug, clap::Args)]
pub struct Common {
    #[command(flatten)]
    pub client: ClientOpts,
    /// How to print answers: a table for people, the proto3 JSON mapping as
    /// JSON or YAML, or only the ids.
    #[arg(short, long, env = "TETHER_OUTPUT", value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// The client commands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Show one connection.
    Get(Get),
    /// List connections (every page, unless --limit), filtered.
    List(List),
    /// Count connections by state, filtered.
    Count(Count),
    /// Create a connection (verified first when its initial state needs it).
    Create(Box<Create>),
    /// Move a connection to another state, as the lifecycle allows.
    Transition(Transition),
    /// Change a connection's fields; only those given change.
    Update(Box<Update>),
    /// Delete a connection: it becomes a DELETED tombstone.
    Delete(Delete),
    /// The history of changes, of one connection or of all.
    Events(Events),
    /// Stream changes as they happen: a snapshot, SYNCED, then each change;
    /// reconnects and resumes by itself when the server goes away.
    Watch(Watch),
    /// The lifecycle table: which states each state may move to, and who may move it.
    Lifecycle(Lifecycle),
    /// The connection definitions the server knows, or one of them.
    Definitions(Definitions),
    /// Credentials: list, create, delete (secrets are never shown).
    #[command(subcommand)]
    Credentials(Credentials),
    /// This client's version, and the server's: its version, since when it
    /// serves, and who you are to it.
    Version(Version),
}

/// Filters shared by list, count and watch.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct Filters {
    /// Only this kind; repeatable (any of them).
    #[arg(long = "kind", value_name = "KIND")]
    kinds: Vec<String>,
    /// Only this state; repeatable (any of them).
    #[arg(long = "state", value_name = "STATE", value_parser = parse_state)]
    states: Vec<i32>,
}

/// Filters of list and count beyond kind and state.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct Search {
    /// Only this type; repeatable (any of them).
    #[arg(long = "type", value_name = "TYPE")]
    types: Vec<String>,
    /// Only connections whose name, url or identity contains this text.
    #[arg(long)]
    search: Option<String>,
    /// Only connections with this label (KEY=VALUE); repeatable (all of them).
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Include DELETED tombstones.
    #[arg(long)]
    show_deleted: bool,
}

#[derive(Debug, clap::Args)]
pub struct Get {
    /// The connection's id.
    id: String,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, clap::Args)]
pub struct List {
    #[command(flatten)]
    filters: Filters,
    #[command(flatten)]
    search: Search,
    /// Order: a field (name, kind, state, create_time, update_time, revision), `desc` after it to reverse.
    #[arg(long)]
    order_by: Option<String>,
    /// Stop after this many connections.
    #[arg(long, value_parser = at_least_one)]
    limit: Option<usize>,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, clap::Args)]
pub struct Count {
    #[command(flatten)]
    filters: Filters,
    #[command(flatten)]
    search: Search,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, clap::Args)]
pub struct Create {
    /// A Connection in the proto3 JSON mapping, as JSON or YAML ("-": stdin);
    /// the flags below override its fields.
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    file: Option<PathBuf>,
    /// The kind (a definition's, e.g. kubernetes, prometheus, tcp).
    #[arg(long)]
    kind: Option<String>,
    /// Where it is: the url that checks contact.
    #[arg(long)]
    url: Option<String>,
    /// A name for people.
    #[arg(long)]
    name: Option<String>,
    /// A description for people.
    #[arg(long)]
    description: Option<String>,
    /// What makes it unique (default: derived from the kind and url).
    #[arg(long)]
    identity: Option<String>,
    /// Its type [default: the definition's].
    #[arg(long = "type")]
    type_: Option<String>,
    /// Its sub-type [default: the definition's].
    #[arg(long)]
    sub_type: Option<String>,
    /// A label (KEY=VALUE); repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Metadata as a JSON object.
    #[arg(long, value_name = "JSON")]
    metadata: Option<String>,
    /// The credential its checks authenticate with.
    #[arg(long = "credential", value_name = "ID")]
    credential_id: Option<String>,
    /// Whether the server probes it in the background [default: the definition's].
    #[arg(long, value_name = "BOOL")]
    managed: Option<bool>,
    /// Whose it is (within your scope) [default: you].
    #[arg(long)]
    owner: Option<String>,
    /// The state to create it in: DISCOVERED (default), REGISTERED, CONNECTED or IGNORED.
    #[arg(long = "state", value_name = "STATE", value_parser = parse_state)]
    initial_state: Option<i32>,
    /// Do not check that it is reachable before REGISTERED or CONNECTED.
    #[arg(long)]
    skip_verification: bool,
    /// A retry with the same id returns the first answer instead of acting twice.
    #[arg(long)]
    request_id: Option<String>,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, clap::Args)]
pub struct Transition {
    /// The connection's id.
    id: String,
    /// The state to move to.
    #[arg(value_parser = parse_state)]
    target: i32,
    /// Why, kept in the history.
    #[arg(long)]
    reason: Option<String>,
    /// Move only if the connection is still at this etag.
    #[arg(long)]
    etag: Option<String>,
    /// Do not check that it is reachable before REGISTERED or CONNECTED.
    #[arg(long)]
    skip_verification: bool,
    /// A retry with the same id returns the first answer instead of acting twice.
    #[arg(long)]
    request_id: Option<String>,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, clap::Args)]
pub struct Update {
    /// The connection's id.
    id: String,
    /// A name for people.
    #[arg(long)]
    name: Option<String>,
    /// A description for people.
    #[arg(long)]
    description: Option<String>,
    /// Where it is: the url that checks contact.
    #[arg(long)]
    url: Option<String>,
    /// What makes it unique.
    #[arg(long)]
    identity: Option<String>,
    /// The labels, all of them (KEY=VALUE); repeatable. Replaces the current labels.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Remove every label.
    #[arg(long, conflicts_with = "labels")]
    clear_labels: bool,
    /// Metadata as a JSON object; replaces the current metadata.
    #[arg(long, value_name = "JSON")]
    metadata: Option<String>,
    /// The credential its checks authenticate with ("" removes it).
    #[arg(long = "credential", value_name = "ID")]
    credential_id: Option<String>,
    /// Whether the server probes it in the background.
    #[arg(long, value_name = "BOOL")]
    managed: Option<bool>,
    /// Change only if the connection is still at this etag.
    #[arg(long)]
    etag: Option<String>,
    /// A retry with the same id returns the first answer instead of acting twice.
    #[arg(long)]
    request_id: Option<String>,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, clap::Args)]
pub struct Delete {
    /// The connection's id.
    id: String,
    /// Delete only if the connection is still at this etag.
    #[arg(long)]
    etag: Option<String>,
    /// Why, kept in the history.
    #[arg(long)]
    reason: Option<String>,
    /// A retry with the same id returns the first answer instead of acting twice.
    #[arg(long)]
    request_id: Option<String>,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, clap::Args)]
pub struct Events {
    /// Only this connection's events.
    id: Option<String>,
    /// Only events after this revision.
    #[arg(long, default_value_t = 0)]
    after: i64,
    /// Stop after this many events.
    #[arg(long, value_parser = at_least_one)]
    limit: Option<usize>,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, clap::Args)]
pub struct Watch {
    /// Resume after revision N (the last one you saw): every change after it,
    /// with no snapshot. Without it: a snapshot of what matches, SYNCED, then changes.
    #[arg(long = "rev", value_name = "N")]
    rev: Option<i64>,
    #[command(flatten)]
    filters: Filters,
    /// Only this connection; repeatable.
    #[arg(long = "id", value_name = "ID")]
    ids: Vec<String>,
    /// Ask for BOOKMARKs (the current revision) while nothing changes.
    #[arg(long)]
    progress: bool,
    /// Stop after this many changes (SYNCED and BOOKMARKs do not count).
    #[arg(long, value_parser = at_least_one)]
    limit: Option<usize>,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, clap::Args)]
pub struct Lifecycle {
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, clap::Args)]
pub struct Definitions {
    /// Show only this kind's definition.
    kind: Option<String>,
    /// Only this model's definitions.
    #[arg(long)]
    model: Option<String>,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, clap::Args)]
pub struct Version {
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, clap::Subcommand)]
pub enum Credentials {
    /// List credentials (never their secrets).
    List(CredentialList),
    /// Store a credential; its secret is read from a file or stdin, never a flag.
    Create(CredentialCreate),
    /// Delete a credential no connection uses.
    Delete(CredentialDelete),
}

#[derive(Debug, clap::Args)]
pub struct CredentialList {
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, clap::Args)]
pub struct CredentialCreate {
    /// Its name.
    name: String,
    /// The kind whose connections may use it (its secret must fit that kind's credential schema).
    #[arg(long = "type")]
    type_: String,
    /// A file holding the secret as a JSON (or YAML) object ("-": stdin):
    /// `token`, or `username` and `password`, or `client_certificate` and
    /// `client_key`, optionally with `ca_certificate`.
    #[arg(long, value_name = "FILE")]
    secret_file: PathBuf,
    /// A host the secret may be sent to; repeatable (at least one).
    #[arg(long = "allowed-host", value_name = "HOST", required = true)]
    allowed_hosts: Vec<String>,
    /// Whose it is (within your scope) [default: you].
    #[arg(long)]
    owner: Option<String>,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, clap::Args)]
pub struct CredentialDelete {
    /// The credential's id.
    id: String,
    #[command(flatten)]
    common: Common,
}

/// A state name in any of the forms people type.
pub fn parse_state(s: &str) -> Result<i32, String> {
    let upper = s.trim().to_ascii_uppercase().replace('-', "_");
    let bare = upper.strip_prefix("CONNECTION_STATE_").unwrap_or(&upper);
    match pb::ConnectionState::from_str_name(&format!("CONNECTION_STATE_{bare}")) {
        Some(pb::ConnectionState::Unspecified) | None => {
            let names: Vec<String> = (1..=8).map(state).collect();
            Err(format!(
                "{s:?} is not a state: use one of {}",
                names.join(", ")
            ))
        }
        Some(st) => Ok(st as i32),
    }
}

fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{s:?}: a limit is a whole number of at least 1")),
    }
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?}: a label is KEY=VALUE")),
    }
}

/// A JSON or YAML document from `path` ("-": stdin).
fn read_document(path: &PathBuf, what: &str) -> Result<serde_json::Value, Failure> {
    let text = if path.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())
            .map_err(|e| Failure::Usage(format!("cannot read {what} from stdin: {e}")))?
    } else {
        std::fs::read_to_string(path)
            .map_err(|e| Failure::Usage(format!("cannot read {what} {}: {e}", path.display())))?
    };
    // YAML is a superset of JSON: one parser reads both.
    serde_norway::from_str(&text)
        .map_err(|e| Failure::Usage(format!("{what} {}: {e}", path.display())))
}

fn metadata(json: &str) -> Result<prost_types::Struct, Failure> {
    let value: serde_json::Value = serde_json::from_str(json)
        .map_err(|e| Failure::Usage(format!("--metadata is not JSON: {e}")))?;
    if !value.is_object() {
        return Err(Failure::Usage("--metadata must be a JSON object".into()));
    }
    render::parse_json("google.protobuf.Struct", value)
        .map_err(|e| Failure::Usage(format!("--metadata: {e}")))
}

fn opt(s: Option<String>) -> String {
    s.unwrap_or_default()
}

/// Runs `command` to its end.
pub async fn run(command: Command) -> Result<(), Failure> {
    let output = match &command {
        Command::Count(Count { common, .. })
        | Command::Events(Events { common, .. })
        | Command::Lifecycle(Lifecycle { common })
        | Command::Definitions(Definitions { common, .. })
        | Command::Version(Version { common })
        | Command::Credentials(Credentials::Delete(CredentialDelete { common, .. })) => {
            Some(common.output)
        }
        _ => None,
    };
    if output == Some(Output::Id) {
        return Err(Failure::Usage(
            "-o id prints the ids of connections or credentials; this command prints neither"
                .into(),
        ));
    }
    match command {
        Command::Get(a) => get(a).await,
        Command::List(a) => list(a).await,
        Command::Count(a) => count(a).await,
        Command::Create(a) => create(*a).await,
        Command::Transition(a) => transition(a).await,
        Command::Update(a) => update(*a).await,
        Command::Delete(a) => delete(a).await,
        Command::Events(a) => events(a).await,
        Command::Watch(a) => watch(a).await,
        Command::Lifecycle(a) => lifecycle(a).await,
        Command::Definitions(a) => definitions(a).await,
        Command::Credentials(Credentials::List(a)) => credential_list(a).await,
        Command::Credentials(Credentials::Create(a)) => credential_create(a).await,
        Command::Credentials(Credentials::Delete(a)) => credential_delete(a).await,
        Command::Version(a) => version(a).await,
    }
}

/// Prints one connection: a row, or the whole message.
fn print_connection(output: Output, c: &pb::Connection) {
    match output {
        Output::Table => table(render::CONNECTION_HEADERS, vec![connection_row(c)]),
        Output::Id => println!("{}", c.id),
        _ => render::print_message(output, "tether.v1.Connection", c),
    }
}

async fn get(a: Get) -> Result<(), Failure> {
    let mut api = a.common.client.connect().await?;
    let req = a
        .common
        .client
        .request(pb::GetConnectionRequest { id: a.id });
    let c = api.connections.get_connection(req).await?.into_inner();
    print_connection(a.common.output, &c);
    Ok(())
}

async fn list(a: List) -> Result<(), Failure> {
    let Clients {
        connections: mut api,
        ..
    } = a.common.client.connect().await?;
    let mut all = pb::ListConnectionsResponse::default();
    loop {
        let want = a.limit.map(|l| l - all.connections.len());
        let req = pb::ListConnectionsRequest {
            page_size: want.map_or(500, |w| w.min(500) as i32),
            page_token: std::mem::take(&mut all.next_page_token),
            kinds: a.filters.kinds.clone(),
            states: a.filters.states.clone(),
            types: a.search.types.clone(),
            search: opt(a.search.search.clone()),
            labels: a.search.labels.iter().cloned().collect(),
            order_by: opt(a.order_by.clone()),
            show_deleted: a.search.show_deleted,
        };
        let page = api
            .list_connections(a.common.client.request(req))
            .await?
            .into_inner();
        all.connections.extend(page.connections);
        all.next_page_token = page.next_page_token;
        all.revision = page.revision;
        let full = a.limit.is_some_and(|l| all.connections.len() >= l);
        if all.next_page_token.is_empty() || full {
            break;
        }
    }
    match a.common.output {
        Output::Table => table(
            render::CONNECTION_HEADERS,
            all.connections.iter().map(connection_row).collect(),
        ),
        Output::Id => all.connections.iter().for_each(|c| println!("{}", c.id)),
        o => render::print_message(o, "tether.v1.ListConnectionsResponse", &all),
    }
    Ok(())
}

async fn count(a: Count) -> Result<(), Failure> {
    let mut api = a.common.client.connect().await?;
    let req = pb::CountConnectionsRequest {
        kinds: a.filters.kinds,
        states: a.filters.states,
        types: a.search.types,
        search: opt(a.search.search),
        labels: a.search.labels.into_iter().collect(),
        show_deleted: a.search.show_deleted,
    };
    let counts = api
        .connections
        .count_connections(a.common.client.request(req))
        .await?
        .into_inner();
    match a.common.output {
        Output::Table => {
            let mut rows: Vec<Vec<String>> = counts
                .counts
                .iter()
                .map(|c| vec![state(c.state), c.count.to_string()])
                .collect();
            rows.push(vec!["TOTAL".into(), counts.total.to_string()]);
            table(&["STATE", "COUNT"], rows);
        }
        o => render::print_message(o, "tether.v1.CountConnectionsResponse", &counts),
    }
    Ok(())
}

async fn create(a: Create) -> Result<(), Failure> {
    let mut c: pb::Connection = match &a.file {
        Some(path) => render::parse_json("tether.v1.Connection", read_document(path, "--file")?)
            .map_err(|e| Failure::Usage(format!("--file {}: {e}", path.display())))?,
        None => pb::Connection::default(),
    };
    let set = |field: &mut String, v: Option<String>| {
        if let Some(v) = v {
            *field = v;
        }
    };
    set(&mut c.kind, a.kind);
    set(&mut c.url, a.url);
    set(&mut c.name, a.name);
    set(&mut c.description, a.description);
    set(&mut c.identity, a.identity);
    set(&mut c.r#type, a.type_);
    set(&mut c.sub_type, a.sub_type);
    set(&mut c.credential_id, a.credential_id);
    set(&mut c.owner, a.owner);
    c.labels.extend(a.labels);
    if let Some(m) = a.metadata {
        c.metadata = Some(metadata(&m)?);
    }
    if a.managed.is_some() {
        c.managed = a.managed;
    }
    if c.kind.is_empty() {
        return Err(Failure::Usage(
            "a connection needs --kind (or `kind` in --file)".into(),
        ));
    }
    let mut api = a.common.client.connect().await?;
    let req = pb::CreateConnectionRequest {
        connection: Some(c),
        request_id: opt(a.request_id),
        initial_state: a.initial_state.unwrap_or(0),
        skip_verification: a.skip_verification,
    };
    let c = api
        .connections
        .create_connection(a.common.client.request(req))
        .await?
        .into_inner();
    print_connection(a.common.output, &c);
    Ok(())
}

async fn transition(a: Transition) -> Result<(), Failure> {
    let mut api = a.common.client.connect().await?;
    let req = pb::TransitionConnectionRequest {
        id: a.id,
        target_state: a.target,
        reason: opt(a.reason),
        etag: opt(a.etag),
        request_id: opt(a.request_id),
        skip_verification: a.skip_verification,
    };
    let c = api
        .connections
        .transition_connection(a.common.client.request(req))
        .await?
        .into_inner();
    print_connection(a.common.output, &c);
    Ok(())
}

async fn update(a: Update) -> Result<(), Failure> {
    let mut c = pb::Connection {
        id: a.id,
        etag: opt(a.etag),
        ..Default::default()
    };
    let mut paths = Vec::new();
    let mut set = |field: &mut String, v: Option<String>, path: &str| {
        if let Some(v) = v {
            *field = v;
            paths.push(path.to_owned());
        }
    };
    set(&mut c.name, a.name, "name");
    set(&mut c.description, a.description, "description");
    set(&mut c.url, a.url, "url");
    set(&mut c.identity, a.identity, "identity");
    set(&mut c.credential_id, a.credential_id, "credential_id");
    if !a.labels.is_empty() || a.clear_labels {
        c.labels = a.labels.into_iter().collect::<BTreeMap<_, _>>();
        paths.push("labels".into());
    }
    if let Some(m) = a.metadata {
        c.metadata = Some(metadata(&m)?);
        paths.push("metadata".into());
    }
    if a.managed.is_some() {
        c.managed = a.managed;
        paths.push("managed".into());
    }
    if paths.is_empty() {
        return Err(Failure::Usage(
            "nothing to change: give at least one of --name, --description, --url, --identity, \
             --label, --clear-labels, --metadata, --credential, --managed"
                .into(),
        ));
    }
    let mut api = a.common.client.connect().await?;
    let req = pb::UpdateConnectionRequest {
        connection: Some(c),
        update_mask: Some(prost_types::FieldMask { paths }),
        request_id: opt(a.request_id),
    };
    let c = api
        .connections
        .update_connection(a.common.client.request(req))
        .await?
        .into_inner();
    print_connection(a.common.output, &c);
    Ok(())
}

async fn delete(a: Delete) -> Result<(), Failure> {
    let mut api = a.common.client.connect().await?;
    let req = pb::DeleteConnectionRequest {
        id: a.id,
        etag: opt(a.etag),
        request_id: opt(a.request_id),
        reason: opt(a.reason),
    };
    let c = api
        .connections
        .delete_connection(a.common.client.request(req))
        .await?
        .into_inner();
    print_connection(a.common.output, &c);
    Ok(())
}

fn event_row(e: &pb::ConnectionEvent) -> Vec<String> {
    vec![
        e.revision.to_string(),
        e.connection_id.clone(),
        short(
            pb::EventType::try_from(e.r#type).map_or("?", |t| t.as_str_name()),
            "EVENT_TYPE_",
        ),
        state(e.from_state),
        state(e.to_state),
        short(
            pb::Trigger::try_from(e.trigger).map_or("?", |t| t.as_str_name()),
            "TRIGGER_",
        ),
        e.actor.clone(),
        render::time(e.time.as_ref()),
        e.reason.clone(),
    ]
}

const EVENT_HEADERS: &[&str] = &[
    "REVISION",
    "CONNECTION",
    "TYPE",
    "FROM",
    "TO",
    "TRIGGER",
    "ACTOR",
    "TIME",
    "REASON",
];

async fn events(a: Events) -> Result<(), Failure> {
    let mut api = a.common.client.connect().await?;
    let mut all = pb::ListConnectionEventsResponse {
        next_after_revision: a.after,
        ..Default::default()
    };
    loop {
        let want = a.limit.map(|l| l - all.events.len());
        let req = pb::ListConnectionEventsRequest {
            connection_id: a.id.clone().unwrap_or_default(),
            after_revision: all.next_after_revision,
            page_size: want.map_or(500, |w| w.min(500) as i32),
        };
        let page = api
            .connections
            .list_connection_events(a.common.client.request(req))
            .await?
            .into_inner();
        // 0: there is no more.
        let done = page.next_after_revision == 0;
        all.events.extend(page.events);
        all.next_after_revision = page.next_after_revision;
        all.revision = page.revision;
        all.compact_revision = page.compact_revision;
        if done || a.limit.is_some_and(|l| all.events.len() >= l) {
            break;
        }
    }
    match a.common.output {
        Output::Table => table(EVENT_HEADERS, all.events.iter().map(event_row).collect()),
        o => render::print_message(o, "tether.v1.ListConnectionEventsResponse", &all),
    }
    Ok(())
}

/// One watch message as a line of the table output.
fn watch_line(m: &pb::WatchConnectionsResponse) -> String {
    let kind = short(
        pb::WatchEventType::try_from(m.r#type).map_or("?", |t| t.as_str_name()),
        "WATCH_EVENT_TYPE_",
    );
    match &m.connection {
        Some(c) => format!(
            "{kind:<9} {:>8}  {}  {:<12}  {}  {}",
            m.revision,
            c.id,
            state(c.state),
            c.kind,
            c.name
        ),
        None => format!("{kind:<9} {:>8}", m.revision),
    }
}

async fn watch(a: Watch) -> Result<(), Failure> {
    use futures::StreamExt;
    // Where to resume: the last revision this watch has wholly seen. Within
    // a snapshot nothing is wholly seen until SYNCED, so a break there
    // starts the snapshot over.
    let mut resume = a.rev;
    let mut changes = 0usize;
    let mut backoff = Duration::from_millis(100);
    let mut connected_once = false;
    if a.common.output == Output::Table {
        println!(
            "{:<9} {:>8}  {:<36}  {:<12}  KIND  NAME",
            "TYPE", "REVISION", "ID", "STATE"
        );
    }
    loop {
        let attempt = async {
            let mut api = a.common.client.connect().await?;
            let req = pb::WatchConnectionsRequest {
                after_revision: resume.unwrap_or(0),
                kinds: a.filters.kinds.clone(),
                states: a.filters.states.clone(),
                ids: a.ids.clone(),
                progress_notify: a.progress,
            };
            let mut stream = api
                .connections
                .watch_connections(tonic::Request::new(req))
                .await?
                .into_inner();
            connected_once = true;
            backoff = Duration::from_millis(100);
            let mut in_snapshot = resume.is_none();
            while let Some(m) = stream.next().await {
                let m = m?;
                match a.common.output {
                    Output::Table => println!("{}", watch_line(&m)),
                    Output::Id => {
                        if let Some(c) = &m.connection {
                            println!("{}", c.id);
                        }
                    }
                    o => render::print_streamed(o, "tether.v1.WatchConnectionsResponse", &m),
                }
                let synced = m.r#type == pb::WatchEventType::Synced as i32;
                let bookmark = m.r#type == pb::WatchEventType::Bookmark as i32;
                if synced {
                    in_snapshot = false;
                }
                if !in_snapshot {
                    resume = Some(m.revision);
                }
                if !in_snapshot && !synced && !bookmark {
                    changes += 1;
                    if a.limit.is_some_and(|l| changes >= l) {
                        return Ok(true);
                    }
                }
            }
            Ok::<bool, Failure>(false)
        };
        let outcome = attempt.await;
        let transient = match &outcome {
            Ok(true) => return Ok(()),
            // The server ended the stream without an error: it is going away.
            Ok(false) => true,
            Err(Failure::Status(s)) => s.code() == tonic::Code::Unavailable,
            Err(Failure::Unreachable(_)) => connected_once,
            Err(Failure::Usage(_)) => false,
        };
        if !transient {
            return outcome.map(|_| ());
        }
        let why = match &outcome {
            Err(Failure::Status(s)) => s.message().to_owned(),
            Err(Failure::Unreachable(m) | Failure::Usage(m)) => m.clone(),
            Ok(_) => "the stream ended".to_owned(),
        };
        match resume {
            Some(r) => eprintln!("watch interrupted ({why}); resuming after revision {r}"),
            None => eprintln!("watch interrupted ({why}); starting over"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn lifecycle(a: Lifecycle) -> Result<(), Failure> {
    let mut api = a.common.client.connect().await?;
    let table_of = api
        .connections
        .describe_lifecycle(a.common.client.request(pb::DescribeLifecycleRequest {}))
        .await?
        .into_inner();
    match a.common.output {
        Output::Table => {
            let names = |v: &[i32], verified: &[i32]| {
                let list: Vec<String> = v
                    .iter()
                    .map(|s| {
                        let mark = if verified.contains(s) { "*" } else { "" };
                        format!("{}{mark}", state(*s))
                    })
                    .collect();
                if list.is_empty() {
                    "-".to_owned()
                } else {
                    list.join(",")
                }
            };
            let rows = table_of
                .states
                .iter()
                .map(|s| {
                    vec![
                        state(s.state),
                        names(&s.user_targets, &s.verified_targets),
                        names(&s.system_targets, &[]),
                        if s.terminal { "yes" } else { "no" }.to_owned(),
                    ]
                })
                .collect();
            table(
                &[
                    "STATE",
                    "USER MAY MOVE TO",
                    "SERVER MAY MOVE TO",
                    "TERMINAL",
                ],
                rows,
            );
            println!("* verified first: the target must be reachable");
        }
        o => render::print_message(o, "tether.v1.DescribeLifecycleResponse", &table_of),
    }
    Ok(())
}

fn definition_row(d: &pb::Definition) -> Vec<String> {
    vec![
        d.kind.clone(),
        d.model.clone(),
        d.display_name.clone(),
        d.managed.to_string(),
        d.check
            .as_ref()
            .map(|c| c.r#type.clone())
            .unwrap_or_default(),
        d.probe_interval
            .as_ref()
            .map(|i| format!("{}s", i.seconds))
            .unwrap_or_default(),
    ]
}

const DEFINITION_HEADERS: &[&str] = &["KIND", "MODEL", "NAME", "MANAGED", "CHECK", "INTERVAL"];

async fn definitions(a: Definitions) -> Result<(), Failure> {
    let mut api = a.common.client.connect().await?;
    match a.kind {
        Some(kind) => {
            let d = api
                .definitions
                .get_definition(a.common.client.request(pb::GetDefinitionRequest { kind }))
                .await?
                .into_inner();
            match a.common.output {
                Output::Table => table(DEFINITION_HEADERS, vec![definition_row(&d)]),
                o => render::print_message(o, "tether.v1.Definition", &d),
            }
        }
        None => {
            let req = pb::ListDefinitionsRequest {
                model: opt(a.model),
                kind: String::new(),
            };
            let all = api
                .definitions
                .list_definitions(a.common.client.request(req))
                .await?
                .into_inner();
            match a.common.output {
                Output::Table => table(
                    DEFINITION_HEADERS,
                    all.definitions.iter().map(definition_row).collect(),
                ),
                o => render::print_message(o, "tether.v1.ListDefinitionsResponse", &all),
            }
        }
    }
    Ok(())
}

const CREDENTIAL_HEADERS: &[&str] = &["ID", "NAME", "TYPE", "OWNER", "ALLOWED HOSTS", "CREATED"];

fn credential_row(c: &pb::Credential) -> Vec<String> {
    vec![
        c.id.clone(),
        c.name.clone(),
        c.r#type.clone(),
        c.owner.clone(),
        c.allowed_hosts.join(","),
        render::time(c.create_time.as_ref()),
    ]
}

async fn credential_list(a: CredentialList) -> Result<(), Failure> {
    let mut api = a.common.client.connect().await?;
    let mut all = pb::ListCredentialsResponse::default();
    loop {
        let req = pb::ListCredentialsRequest {
            page_size: 500,
            page_token: std::mem::take(&mut all.next_page_token),
        };
        let page = api
            .credentials
            .list_credentials(a.common.client.request(req))
            .await?
            .into_inner();
        all.credentials.extend(page.credentials);
        all.next_page_token = page.next_page_token;
        if all.next_page_token.is_empty() {
            break;
        }
    }
    match a.common.output {
        Output::Table => table(
            CREDENTIAL_HEADERS,
            all.credentials.iter().map(credential_row).collect(),
        ),
        Output::Id => all.credentials.iter().for_each(|c| println!("{}", c.id)),
        o => render::print_message(o, "tether.v1.ListCredentialsResponse", &all),
    }
    Ok(())
}

async fn credential_create(a: CredentialCreate) -> Result<(), Failure> {
    let secret = read_document(&a.secret_file, "--secret-file")?;
    if !secret.is_object() {
        return Err(Failure::Usage("--secret-file must hold an object".into()));
    }
    let secret = render::parse_json("google.protobuf.Struct", secret)
        .map_err(|e| Failure::Usage(format!("--secret-file: {e}")))?;
    let mut api = a.common.client.connect().await?;
    let req = pb::CreateCredentialRequest {
        name: a.name,
        r#type: a.type_,
        secret: Some(secret),
        owner: opt(a.owner),
        allowed_hosts: a.allowed_hosts,
    };
    let c = api
        .credentials
        .create_credential(a.common.client.request(req))
        .await?
        .into_inner();
    match a.common.output {
        Output::Table => table(CREDENTIAL_HEADERS, vec![credential_row(&c)]),
        Output::Id => println!("{}", c.id),
        o => render::print_message(o, "tether.v1.Credential", &c),
    }
    Ok(())
}

async fn credential_delete(a: CredentialDelete) -> Result<(), Failure> {
    let mut api = a.common.client.connect().await?;
    api.credentials
        .delete_credential(
            a.common
                .client
                .request(pb::DeleteCredentialRequest { id: a.id.clone() }),
        )
        .await?;
    if a.common.output == Output::Table {
        println!("deleted credential {}", a.id);
    } else {
        render::print_message(
            a.common.output,
            "tether.v1.DeleteCredentialResponse",
            &pb::DeleteCredentialResponse {},
        );
    }
    Ok(())
}

async fn version(a: Version) -> Result<(), Failure> {
    let mut api = a.common.client.connect().await?;
    let info = api
        .connections
        .get_server_info(a.common.client.request(pb::GetServerInfoRequest {}))
        .await?
        .into_inner();
    match a.common.output {
        Output::Table => {
            println!("client: {}", env!("CARGO_PKG_VERSION"));
            println!("server: {}", info.version);
            println!("serving since: {}", render::time(info.start_time.as_ref()));
            println!("you are: {} ({})", info.principal, info.roles.join(", "));
        }
        o => render::print_message(o, "tether.v1.ServerInfo", &info),
    }
    Ok(())
}
