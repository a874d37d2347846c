//! `secretfs secret …`

use anyhow::Result;
use secretfs_proto::v1;
use serde_json::{json, Value};

use crate::args::{ConnArgs, Format, IdOrNone, SecretCmd};
use crate::input::read_content;
use crate::output::{print, time, Table};
use crate::{confirm, connect};

pub fn meta_json(m: &v1::SecretMeta) -> Value {
    json!({
        "name": m.name,
        "id": m.id,
        "description": m.description,
        "labels": m.labels,
        "mode": if m.mode == 0 { Value::Null } else { json!(format!("{:04o}", m.mode)) },
        "owner": m.owner,
        "group": m.group,
        "expires_at": m.expires_at.map(time),
        "expired": m.expires_at.is_some_and(|t| t <= now()),
        "current_version": m.current_version,
        "version_count": m.version_count,
        "size": m.size,
        "created_at": time(m.created_at),
        "updated_at": time(m.updated_at),
        "version_created_at": time(m.version_created_at),
    })
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn describe(m: &v1::SecretMeta) -> Table {
    let mut labels: Vec<_> = m.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    labels.sort();
    Table::vertical(vec![
        ("name", m.name.clone()),
        (
            "version",
            format!("{} of {}", m.current_version, m.version_count),
        ),
        ("size", format!("{} bytes", m.size)),
        (
            "mode",
            if m.mode == 0 {
                "mount default".into()
            } else {
                format!("{:04o}", m.mode)
            },
        ),
        (
            "owner",
            m.owner.map_or("mount default".into(), |u| u.to_string()),
        ),
        (
            "group",
            m.group.map_or("mount default".into(), |g| g.to_string()),
        ),
        ("description", m.description.clone()),
        ("labels", labels.join(", ")),
        (
            "expires",
            match m.expires_at {
                None => "never".into(),
                Some(t) if t <= now() => format!("{} (EXPIRED)", time(t)),
                Some(t) => time(t),
            },
        ),
        ("created", time(m.created_at)),
        ("updated", time(m.updated_at)),
    ])
}

fn list_table(secrets: &[v1::SecretMeta]) -> Table {
    let mut t =
        Table::new(&["NAME", "VERSION", "SIZE", "MODE", "UPDATED", "EXPIRES"]).empty("no secrets");
    for m in secrets {
        t.row(vec![
            m.name.clone(),
            m.current_version.to_string(),
            m.size.to_string(),
            if m.mode == 0 {
                "-".into()
            } else {
                format!("{:04o}", m.mode)
            },
            time(m.updated_at),
            match m.expires_at {
                None => "-".into(),
                Some(t) if t <= now() => format!("{} (EXPIRED)", time(t)),
                Some(t) => time(t),
            },
        ]);
    }
    t
}

pub fn print_list(format: Format, secrets: &[v1::SecretMeta]) {
    let json = Value::Array(secrets.iter().map(meta_json).collect());
    print(format, &json, list_table(secrets));
}

pub async fn run(conn: &ConnArgs, cmd: SecretCmd, format: Format) -> Result<()> {
    match cmd {
        SecretCmd::Add(a) => {
            // Read before connecting: a missing file fails without a round trip.
            let mut content = read_content(a.from_file.as_deref(), a.allow_empty)?;
            let mut client = connect::admin(conn).await?;
            let req = v1::CreateSecretRequest {
                name: a.name,
                content: std::mem::take(&mut *content),
                description: a.description,
                labels: a.labels.into_iter().collect(),
                mode: a.mode.unwrap_or(0),
                owner: a.owner,
                group: a.group,
                expires_at: a.expires,
                allow_past_expiry: a.force,
            };
            let m = client.create_secret(req).await?.into_inner();
            report_change(format, &m, "added");
        }
        SecretCmd::Rotate {
            name,
            from_file,
            allow_empty,
            expires,
            no_expires,
            force,
        } => {
            let mut content = read_content(from_file.as_deref(), allow_empty)?;
            let mut client = connect::admin(conn).await?;
            let m = client
                .rotate_secret(v1::RotateSecretRequest {
                    name,
                    content: std::mem::take(&mut *content),
                    expires_at: expires,
                    clear_expiry: no_expires,
                    allow_past_expiry: force,
                })
                .await?
                .into_inner();
            report_change(format, &m, "rotated");
        }
        SecretCmd::Update(a) => {
            let mut client = connect::admin(conn).await?;
            let (owner, clear_owner) = IdOrNone::update(a.owner);
            let (group, clear_group) = IdOrNone::update(a.group);
            let m = client
                .update_secret(v1::UpdateSecretRequest {
                    name: a.name,
                    description: a.description,
                    labels: a.labels.into_iter().collect(),
                    remove_labels: a.remove_labels,
                    clear_labels: a.clear_labels,
                    mode: a.mode,
                    owner,
                    clear_owner,
                    group,
                    clear_group,
                    expires_at: a.expires,
                    clear_expiry: a.no_expires,
                    allow_past_expiry: a.force,
                })
                .await?
                .into_inner();
            match format {
                Format::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&meta_json(&m)).unwrap_or_default()
                ),
                Format::Text => {
                    println!("updated secret {} (no new version)", m.name);
                    describe(&m).print();
                }
            }
        }
        SecretCmd::List => {
            let mut client = connect::admin(conn).await?;
            let list = client
                .list_secrets(v1::ListSecretsRequest {})
                .await?
                .into_inner();
            print_list(format, &list.secrets);
        }
        SecretCmd::Describe { name } => {
            let mut client = connect::admin(conn).await?;
            let m = client
                .describe_secret(v1::SecretRef { name })
                .await?
                .into_inner();
            print(format, &meta_json(&m), describe(&m));
        }
        SecretCmd::Versions { name } => {
            let mut client = connect::admin(conn).await?;
            let list = client
                .list_versions(v1::SecretRef { name })
                .await?
                .into_inner();
            let json = Value::Array(
                list.versions
                    .iter()
                    .map(|v| {
                        json!({"version": v.version, "current": v.current, "size": v.size,
                               "created_at": time(v.created_at), "created_by": v.created_by})
                    })
                    .collect(),
            );
            let mut t = Table::new(&["VERSION", "CURRENT", "SIZE", "CREATED", "BY"]);
            for v in &list.versions {
                t.row(vec![
                    v.version.to_string(),
                    if v.current { "*".into() } else { String::new() },
                    v.size.to_string(),
                    time(v.created_at),
                    v.created_by.clone(),
                ]);
            }
            print(format, &json, t);
        }
        SecretCmd::Rollback { name, to } => {
            let mut client = connect::admin(conn).await?;
            let m = client
                .rollback_secret(v1::RollbackSecretRequest { name, version: to })
                .await?
                .into_inner();
            report_change(format, &m, "rolled back");
        }
        SecretCmd::Delete { name, yes } => {
            let mut client = connect::admin(conn).await?;
            if confirm::wanted(yes) {
                let m = client
                    .describe_secret(v1::SecretRef { name: name.clone() })
                    .await?
                    .into_inner();
                let groups = client.list_groups(v1::Empty {}).await?.into_inner().groups;
                let granted: Vec<String> = groups
                    .into_iter()
                    .filter(|g| g.secrets.contains(&name))
                    .map(|g| g.name)
                    .collect();
                let groups = if granted.is_empty() {
                    String::new()
                } else {
                    format!(" and the groups that grant it{}", confirm::listed(&granted))
                };
                confirm::ask(&format!(
                    "Delete secret {name} and its {}? It leaves every mount{groups}; no rollback brings it back.",
                    confirm::count(m.version_count as usize, "version"),
                ))?;
            }
            client
                .delete_secret(v1::SecretRef { name: name.clone() })
                .await?;
            match format {
                Format::Json => println!("{}", json!({"deleted": name})),
                Format::Text => println!("deleted secret {name}"),
            }
        }
    }
    Ok(())
}

fn report_change(format: Format, m: &v1::SecretMeta, what: &str) {
    match format {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&meta_json(m)).unwrap_or_default()
        ),
        Format::Text => println!(
            "{what} secret {} (version {}, {} bytes)",
            m.name, m.current_version, m.size
        ),
    }
}
