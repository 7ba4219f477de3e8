//! How the client commands print answers: JSON and YAML exactly as the
//! proto3 JSON mapping spells a message (through the descriptors the server
//! also serves by reflection), and tables for people.

use crate::pb::tether::v1 as pb;
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};
use std::sync::OnceLock;

/// `-o`: how answers are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Columns for people.
    Table,
    /// The proto3 JSON mapping (as grpcurl and every other proto JSON reader
    /// spell it); a watch prints one object per line.
    Json,
    /// The same mapping as YAML; a watch prints one document per change.
    Yaml,
    /// Only the ids of the connections or credentials, one per line, for
    /// scripts: `ID=$(tether create ... -o id)`.
    Id,
}

/// The descriptors of every message the API speaks.
pub(crate) fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        DescriptorPool::decode(crate::pb::FILE_DESCRIPTOR_SET)
            .expect("the built-in descriptor set decodes")
    })
}

/// `message` (whose full proto name is `name`) as its proto3 JSON value.
pub fn json_value<M: prost::Message>(name: &str, message: &M) -> serde_json::Value {
    let desc = pool()
        .get_message_by_name(name)
        .unwrap_or_else(|| panic!("{name} is in the descriptor set"));
    let dynamic = DynamicMessage::decode(desc, message.encode_to_vec().as_slice())
        .expect("a message decodes as itself");
    dynamic
        .serialize_with_options(serde_json::value::Serializer, &SerializeOptions::new())
        .expect("a message serialises to JSON")
}

/// Parses proto3 JSON (or YAML, read as JSON) into the message `name`.
pub fn parse_json<M: prost::Message + Default>(
    name: &str,
    value: serde_json::Value,
) -> Result<M, String> {
    let desc = pool()
        .get_message_by_name(name)
        .unwrap_or_else(|| panic!("{name} is in the descriptor set"));
    let dynamic = DynamicMessage::deserialize(desc, value).map_err(|e| e.to_string())?;
    dynamic.transcode_to::<M>().map_err(|e| e.to_string())
}

/// Prints one message as JSON (indented) or YAML.
pub fn print_message<M: prost::Message>(output: Output, name: &str, message: &M) {
    let value = json_value(name, message);
    match output {
        Output::Json | Output::Table | Output::Id => {
            println!(
                "{}",
                serde_json::to_string_pretty(&value).expect("JSON values print")
            );
        }
        Output::Yaml => print!(
            "{}",
            serde_norway::to_string(&value).expect("JSON values print as YAML")
        ),
    }
}

/// Prints one message of a stream: JSON on one line, YAML as a document.
pub fn print_streamed<M: prost::Message>(output: Output, name: &str, message: &M) {
    let value = json_value(name, message);
    match output {
        Output::Json | Output::Table | Output::Id => {
            println!(
                "{}",
                serde_json::to_string(&value).expect("JSON values print")
            );
        }
        Output::Yaml => print!(
            "---\n{}",
            serde_norway::to_string(&value).expect("JSON values print as YAML")
        ),
    }
}

/// A state's name without its enum prefix: `REGISTERED`.
pub fn state(s: i32) -> String {
    short(
        pb::ConnectionState::try_from(s)
            .map(|s| s.as_str_name())
            .unwrap_or("?"),
        "CONNECTION_STATE_",
    )
}

/// An enum value's name without its prefix.
pub fn short(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix).unwrap_or(name).to_owned()
}

/// Left-aligned columns, two spaces apart, headers first.
pub fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            out.push_str(cell);
            if i < last {
                let pad = w - cell.chars().count() + 2;
                out.extend(std::iter::repeat_n(' ', pad));
            }
        }
        println!("{}", out.trim_end());
    };
    line(headers.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// The columns of a connection in a table.
pub const CONNECTION_HEADERS: &[&str] = &["ID", "KIND", "NAME", "STATE", "REVISION", "URL"];

/// A connection's row under [`CONNECTION_HEADERS`].
pub fn connection_row(c: &pb::Connection) -> Vec<String> {
    vec![
        c.id.clone(),
        c.kind.clone(),
        c.name.clone(),
        state(c.state),
        c.revision.to_string(),
        c.url.clone(),
    ]
}

/// A timestamp as RFC 3339, UTC, to the second.
pub fn time(t: Option<&prost_types::Timestamp>) -> String {
    t.and_then(|t| {
        let d = std::time::Duration::new(u64::try_from(t.seconds).ok()?, 0);
        Some(humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + d).to_string())
    })
    .unwrap_or_default()
}
