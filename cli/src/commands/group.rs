//! `secretfs group …`

use anyhow::Result;
use secretfs_proto::v1;
use serde_json::{json, Value};

use crate::args::{ConnArgs, Format, GroupCmd};
use crate::output::{print, time, Table};
use crate::{confirm, connect};

fn group_json(g: &v1::GroupInfo) -> Value {
    json!({"name": g.name, "description": g.description, "created_at": time(g.created_at),
           "clients": g.clients, "secrets": g.secrets})
}

fn show(format: Format, g: &v1::GroupInfo, what: &str) {
    match format {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&group_json(g)).unwrap_or_default()
        ),
        Format::Text => println!(
            "{what}; group {} has clients [{}] and secrets [{}]",
            g.name,
            g.clients.join(", "),
            g.secrets.join(", ")
        ),
    }
}

pub async fn run(conn: &ConnArgs, cmd: GroupCmd, format: Format) -> Result<()> {
    let mut c = connect::admin(conn).await?;
    match cmd {
        GroupCmd::Add { name, description } => {
            let g = c
                .create_group(v1::CreateGroupRequest { name, description })
                .await?
                .into_inner();
            show(format, &g, &format!("added group {}", g.name));
        }
        GroupCmd::List => {
            let list = c.list_groups(v1::Empty {}).await?.into_inner();
            let json = Value::Array(list.groups.iter().map(group_json).collect());
            let mut t =
                Table::new(&["NAME", "CLIENTS", "SECRETS", "DESCRIPTION"]).empty("no groups");
            for g in &list.groups {
                t.row(vec![
                    g.name.clone(),
                    g.clients.join(","),
                    g.secrets.join(","),
                    g.description.clone(),
                ]);
            }
            print(format, &json, t);
        }
        GroupCmd::Remove { name, yes } => {
            if confirm::wanted(yes) {
                let groups = c.list_groups(v1::Empty {}).await?.into_inner().groups;
                // Not listed: let the server say "not found" with its hint.
                if let Some(g) = groups.iter().find(|g| g.name == name) {
                    confirm::ask(&format!(
                        "Remove group {name}? Its {}{} lose the {}{} it grants, unless another group grants them.",
                        confirm::count(g.clients.len(), "client"),
                        confirm::listed(&g.clients),
                        confirm::count(g.secrets.len(), "secret"),
                        confirm::listed(&g.secrets),
                    ))?;
                }
            }
            c.remove_group(v1::GroupRef { name: name.clone() }).await?;
            match format {
                Format::Json => println!("{}", json!({"removed": name})),
                Format::Text => println!("removed group {name}"),
            }
        }
        GroupCmd::AddClient { group, client } => {
            let g = c
                .add_client_to_group(v1::GroupClientRequest { group, client })
                .await?
                .into_inner();
            show(format, &g, "client added");
        }
        GroupCmd::RemoveClient { group, client } => {
            let g = c
                .remove_client_from_group(v1::GroupClientRequest { group, client })
                .await?
                .into_inner();
            show(format, &g, "client removed");
        }
        GroupCmd::AddSecret { group, secret } => {
            let g = c
                .add_secret_to_group(v1::GroupSecretRequest { group, secret })
                .await?
                .into_inner();
            show(format, &g, "secret granted");
        }
        GroupCmd::RemoveSecret { group, secret } => {
            let g = c
                .remove_secret_from_group(v1::GroupSecretRequest { group, secret })
                .await?
                .into_inner();
            show(format, &g, "secret revoked");
        }
    }
    Ok(())
}
