//! The admin registry and roles: certificates are honoured by recorded serial, names are unique,
//! revocation works per serial, every admin RPC needs its role, refusals are audited, and stores
//! from before the registry are migrated.

#![allow(clippy::unwrap_used)]

use convoy_testkit::support as common;

use std::collections::BTreeSet;

use common::dial;
use convoy_controller::store::{Store, Tree};
use convoy_pki::{Ca, CertInfo, ClientIdentity, TrustDomain};
use convoy_proto::v1 as pb;
use convoy_testkit::{LocalController, LocalOptions};
use pb::admin_service_client::AdminServiceClient;
use tonic::transport::Channel;
use tonic::Code;

async fn controller(dir: &std::path::Path) -> LocalController {
    LocalController::start(&dir.join("ctl"), LocalOptions::default()).await.unwrap()
}

fn init_admin(ctl: &LocalController) -> ClientIdentity {
    ClientIdentity {
        cert_pem: std::fs::read_to_string(ctl.dir.join("admin.pem")).unwrap(),
        key_pem: std::fs::read_to_string(ctl.dir.join("admin.key")).unwrap(),
    }
}

fn serial_of(id: &ClientIdentity) -> String {
    CertInfo::from_pem(&id.cert_pem).unwrap().serial
}

async fn client(ctl: &LocalController, id: &ClientIdentity) -> AdminServiceClient<Channel> {
    let ch = dial(&ctl.grpc_addr.to_string(), &ctl.ca_pem().unwrap(), Some(id)).await.unwrap();
    AdminServiceClient::new(ch)
}

/// Adds an admin through the registry, as the first admin; returns its identity.
async fn add_admin(ctl: &LocalController, name: &str, role: &str) -> ClientIdentity {
    let kc = convoy_pki::generate_csr().unwrap();
    let resp = client(ctl, &init_admin(ctl))
        .await
        .issue_admin(pb::IssueAdminRequest { name: name.into(), csr_der: kc.csr_der, role: role.into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(CertInfo::from_pem(&resp.certificate_pem).unwrap().serial, resp.serial);
    ClientIdentity { cert_pem: resp.certificate_pem, key_pem: kc.key_pem }
}

/// Issues a new certificate for `name` as `by`.
async fn rekey(
    ctl: &LocalController,
    by: &ClientIdentity,
    name: &str,
) -> Result<ClientIdentity, tonic::Status> {
    let kc = convoy_pki::generate_csr().unwrap();
    let resp = client(ctl, by)
        .await
        .rekey_admin(pb::RekeyAdminRequest { name: name.into(), csr_der: kc.csr_der })
        .await?
        .into_inner();
    Ok(ClientIdentity { cert_pem: resp.certificate_pem, key_pem: kc.key_pem })
}

/// A certificate for `name` signed with the controller's CA key but never recorded: what someone
/// with the CA key, or an old-model `admins add`, could produce.
fn minted_outside_registry(ctl: &LocalController, name: &str) -> ClientIdentity {
    let ca = Ca::load(
        TrustDomain::new("convoy.test").unwrap(),
        &ctl.ca_pem().unwrap(),
        &std::fs::read_to_string(ctl.dir.join("ca.key")).unwrap(),
    )
    .unwrap();
    let (cert, key) = ca.issue_admin(name).unwrap();
    ClientIdentity { cert_pem: cert.cert_pem, key_pem: key }
}

async fn audit(ctl: &LocalController) -> Vec<serde_json::Value> {
    let resp =
        client(ctl, &init_admin(ctl)).await.audit(pb::AuditRequest::default()).await.unwrap().into_inner();
    resp.entries
        .into_iter()
        .map(|e| {
            let params: serde_json::Value = serde_json::from_str(&e.params_json).unwrap();
            serde_json::json!({
                "seq": e.seq, "actor": e.actor, "action": e.action, "target": e.target,
                "params": params, "outcome": e.outcome,
            })
        })
        .collect()
}

/// Every AdminService RPC, in the order called by [`call_every_rpc`].
const RPCS: [&str; 21] = [
    "CreateToken",
    "ListAgents",
    "RevokeAgent",
    "PushRelease",
    "ListReleases",
    "RemoveRelease",
    "Rollback",
    "Logs",
    "Deploy",
    "GetRollout",
    "ListRollouts",
    "ControlRollout(pause)",
    "ControlRollout(resume)",
    "ControlRollout(abort)",
    "Freeze(list)",
    "Freeze(add)",
    "Freeze(rm)",
    "Status",
    "Audit",
    "IssueAdmin",
    "RevokeAdmin",
];

/// RPCs beyond [`RPCS`] whose arguments depend on the caller: rekeying oneself and another admin,
/// and listing admins.
const NAMED_RPCS: [&str; 3] = ["RekeyAdmin(self)", "RekeyAdmin(other)", "ListAdmins"];

/// Calls every AdminService RPC once as `id`, with arguments that change nothing lasting (unknown
/// names, malformed input) where the call would otherwise change the fleet. Returns each RPC's
/// status code (Ok when it succeeded).
async fn call_every_rpc(
    ctl: &LocalController,
    id: &ClientIdentity,
    other: &str,
) -> Vec<(&'static str, Code)> {
    let mut c = client(ctl, id).await;
    let code = |r: Result<(), tonic::Status>| r.err().map(|s| s.code()).unwrap_or(Code::Ok);
    let control = |action: pb::RolloutAction| pb::ControlRolloutRequest {
        id: "no-such-rollout".into(),
        action: action as i32,
        ..Default::default()
    };
    let freeze = |action: pb::FreezeAction| pb::FreezeRequest {
        action: action as i32,
        from_unix: 4_000_000_000,
        to_unix: 4_000_000_060,
        reason: "test".into(),
        app: "no-such-app".into(),
        id: "no-such-freeze".into(),
        ..Default::default()
    };
    let kc = convoy_pki::generate_csr().unwrap();
    let mut out = vec![
        (
            RPCS[0],
            code(
                c.create_token(pb::CreateTokenRequest {
                    region: "eu-west".into(),
                    ttl_secs: 60,
                    labels: Default::default(),
                    allow_agent_labels: false,
                    environment: String::new(),
                })
                .await
                .map(drop),
            ),
        ),
        (RPCS[1], code(c.list_agents(pb::ListAgentsRequest::default()).await.map(drop))),
        (
            RPCS[2],
            code(c.revoke_agent(pb::RevokeAgentRequest { agent_id: "no-such-agent".into() }).await.map(drop)),
        ),
        (
            RPCS[3],
            code(
                c.push_release(tokio_stream::iter(vec![pb::PushChunk { data: b"not a bundle".to_vec() }]))
                    .await
                    .map(drop),
            ),
        ),
        (RPCS[4], code(c.list_releases(pb::ListReleasesRequest::default()).await.map(drop))),
        (
            RPCS[5],
            code(
                c.remove_release(pb::RemoveReleaseRequest {
                    app: "no-such-app".into(),
                    version: "1.0.0".into(),
                })
                .await
                .map(drop),
            ),
        ),
        (
            RPCS[6],
            code(
                c.rollback(pb::RollbackRequest {
                    app: "no-such-app".into(),
                    agent_ids: vec!["no-such-agent".into()],
                    reason: "test".into(),
                    ..Default::default()
                })
                .await
                .map(drop),
            ),
        ),
        (
            RPCS[7],
            code(
                c.logs(pb::LogsRequest {
                    agent_id: "no-such-agent".into(),
                    app: "no-such-app".into(),
                    lines: 1,
                })
                .await
                .map(drop),
            ),
        ),
        (
            RPCS[8],
            code(
                c.deploy(pb::DeployRequest {
                    app: "no-such-app".into(),
                    version: "1.0.0".into(),
                    ..Default::default()
                })
                .await
                .map(drop),
            ),
        ),
        (RPCS[9], code(c.get_rollout(pb::RolloutRef { id: "no-such-rollout".into() }).await.map(drop))),
        (RPCS[10], code(c.list_rollouts(pb::ListRolloutsRequest::default()).await.map(drop))),
        (RPCS[11], code(c.control_rollout(control(pb::RolloutAction::Pause)).await.map(drop))),
        (RPCS[12], code(c.control_rollout(control(pb::RolloutAction::Resume)).await.map(drop))),
        (RPCS[13], code(c.control_rollout(control(pb::RolloutAction::Abort)).await.map(drop))),
        (RPCS[14], code(c.freeze(freeze(pb::FreezeAction::List)).await.map(drop))),
        (RPCS[15], code(c.freeze(freeze(pb::FreezeAction::Add)).await.map(drop))),
        (RPCS[16], code(c.freeze(freeze(pb::FreezeAction::Remove)).await.map(drop))),
        (RPCS[17], code(c.status(pb::StatusRequest {}).await.map(drop))),
        (RPCS[18], code(c.audit(pb::AuditRequest::default()).await.map(drop))),
        (
            RPCS[19],
            code(
                c.issue_admin(pb::IssueAdminRequest {
                    name: "never-added".into(),
                    csr_der: b"not a csr".to_vec(),
                    role: "viewer".into(),
                })
                .await
                .map(drop),
            ),
        ),
        (
            RPCS[20],
            code(
                c.revoke_admin(pb::RevokeAdminRequest {
                    name: "no-such-admin".into(),
                    serial: String::new(),
                })
                .await
                .map(drop),
            ),
        ),
    ];
    out.push((
        NAMED_RPCS[0],
        code(
            c.rekey_admin(pb::RekeyAdminRequest { name: String::new(), csr_der: kc.csr_der.clone() })
                .await
                .map(drop),
        ),
    ));
    out.push((
        NAMED_RPCS[1],
        code(
            c.rekey_admin(pb::RekeyAdminRequest { name: other.into(), csr_der: b"not a csr".to_vec() })
                .await
                .map(drop),
        ),
    ));
    out.push((NAMED_RPCS[2], code(c.list_admins(pb::ListAdminsRequest {}).await.map(drop))));
    out
}

/// The least role each RPC needs, written out independently of the controller's table.
fn least_role(rpc: &str) -> usize {
    const VIEWER: usize = 0;
    const DEPLOYER: usize = 1;
    const ADMIN: usize = 3;
    match rpc {
        "ListAgents" | "ListReleases" | "GetRollout" | "ListRollouts" | "Freeze(list)" | "Status"
        | "Audit" | "RekeyAdmin(self)" => VIEWER,
        "PushRelease"
        | "Rollback"
        | "Logs"
        | "Deploy"
        | "ControlRollout(pause)"
        | "ControlRollout(resume)"
        | "ControlRollout(abort)" => DEPLOYER,
        "CreateToken" | "RevokeAgent" | "RemoveRelease" | "Freeze(add)" | "Freeze(rm)" | "IssueAdmin"
        | "RevokeAdmin" | "RekeyAdmin(other)" | "ListAdmins" => ADMIN,
        other => panic!("no expectation for {other}"),
    }
}

#[tokio::test]
async fn every_rpc_needs_its_role_and_refusals_are_audited() {
    let tmp = tempfile::tempdir().unwrap();
    let ctl = controller(tmp.path()).await;
    let roles = ["viewer", "deployer", "approver", "admin"];
    let mut ids = Vec::new();
    for role in roles {
        ids.push(add_admin(&ctl, &format!("{role}-1"), role).await);
    }
    let mut refused = BTreeSet::new();
    for (rank, (role, id)) in roles.iter().zip(&ids).enumerate() {
        let results = call_every_rpc(&ctl, id, "admin").await;
        assert_eq!(results.len(), RPCS.len() + NAMED_RPCS.len(), "every RPC is in the table");
        for (rpc, code) in results {
            let allowed = rank >= least_role(rpc);
            if allowed {
                assert_ne!(code, Code::PermissionDenied, "{role} must be allowed {rpc}");
            } else {
                assert_eq!(code, Code::PermissionDenied, "{role} must be refused {rpc}");
                refused.insert(format!("admin/{role}-1"));
            }
        }
    }
    // The refusal names the role needed and the caller's role.
    let status = client(&ctl, &ids[0])
        .await
        .deploy(pb::DeployRequest { app: "x".into(), version: "1.0.0".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().contains("role viewer") && status.message().contains("needs role deployer"),
        "{}",
        status.message()
    );
    // Every refused caller left refused entries, naming the action and the roles.
    let log = audit(&ctl).await;
    for who in &refused {
        let theirs: Vec<_> = log
            .iter()
            .filter(|e| e["actor"] == who.as_str() && e["outcome"].as_str().unwrap().starts_with("refused:"))
            .collect();
        assert!(
            theirs.iter().any(|e| e["outcome"].as_str().unwrap().contains("needs role")),
            "{who}: {theirs:?}"
        );
    }
    let viewer_refusals: BTreeSet<_> = log
        .iter()
        .filter(|e| e["actor"] == "admin/viewer-1" && e["outcome"].as_str().unwrap().contains("needs role"))
        .map(|e| e["action"].as_str().unwrap().to_owned())
        .collect();
    for action in
        ["token.create", "release.push", "deploy", "rollout.pause", "freeze.add", "admin.add", "admin.list"]
    {
        assert!(viewer_refusals.contains(action), "{action} refusal not audited: {viewer_refusals:?}");
    }
    ctl.stop().await.unwrap();
}

#[tokio::test]
async fn impersonation_is_refused_and_names_are_unique() {
    let tmp = tempfile::tempdir().unwrap();
    let ctl = controller(tmp.path()).await;
    let ops = add_admin(&ctl, "ops", "deployer").await;
    let mut first = client(&ctl, &init_admin(&ctl)).await;

    // A second admin under an existing name is refused, the first admin's name included.
    for name in ["ops", "admin"] {
        let kc = convoy_pki::generate_csr().unwrap();
        let status = first
            .issue_admin(pb::IssueAdminRequest {
                name: name.into(),
                csr_der: kc.csr_der,
                role: "admin".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
        assert!(status.message().contains("already exists"), "{}", status.message());
    }
    // An unknown role is refused too.
    let status = first
        .issue_admin(pb::IssueAdminRequest {
            name: "root".into(),
            csr_der: convoy_pki::generate_csr().unwrap().csr_der,
            role: "root".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    // Certificates for recorded names, and for a name never added, signed by the real CA but
    // not issued through the registry, are refused on every RPC.
    for name in ["admin", "ops", "ghost"] {
        let forged = minted_outside_registry(&ctl, name);
        for (rpc, code) in call_every_rpc(&ctl, &forged, "ops").await {
            assert_eq!(code, Code::PermissionDenied, "forged admin/{name} must be refused {rpc}");
        }
        let status = client(&ctl, &forged).await.status(pb::StatusRequest {}).await.unwrap_err();
        assert!(status.message().contains("not recorded in the admin registry"), "{}", status.message());
        let serial = serial_of(&forged);
        let log = audit(&ctl).await;
        assert!(
            log.iter().any(|e| e["actor"] == format!("admin/{name}").as_str()
                && e["params"]["serial"] == serial.as_str()
                && e["outcome"].as_str().unwrap().contains("not recorded")),
            "the forged certificate's attempts are audited"
        );
    }
    // The real holders keep working.
    client(&ctl, &ops).await.status(pb::StatusRequest {}).await.unwrap();
    first.status(pb::StatusRequest {}).await.unwrap();
    ctl.stop().await.unwrap();
}

#[tokio::test]
async fn revoking_one_serial_keeps_the_others_and_rekey_follows_roles() {
    let tmp = tempfile::tempdir().unwrap();
    let ctl = controller(tmp.path()).await;
    let first = init_admin(&ctl);
    let ops1 = add_admin(&ctl, "ops", "viewer").await;
    let watcher = add_admin(&ctl, "watcher", "viewer").await;
    // A viewer may rekey itself but nobody else.
    let ops2 = rekey(&ctl, &ops1, "").await.unwrap();
    let status = rekey(&ctl, &ops1, "watcher").await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    // An admin may rekey others; rekeying an unknown name is NotFound.
    let ops3 = rekey(&ctl, &first, "ops").await.unwrap();
    assert_eq!(rekey(&ctl, &first, "nobody").await.unwrap_err().code(), Code::NotFound);
    let serials = [serial_of(&ops1), serial_of(&ops2), serial_of(&ops3)];
    for id in [&ops1, &ops2, &ops3] {
        client(&ctl, id).await.status(pb::StatusRequest {}).await.unwrap();
    }

    // Revoke just the first serial: the others keep working.
    let mut admin = client(&ctl, &first).await;
    let resp = admin
        .revoke_admin(pb::RevokeAdminRequest { name: "ops".into(), serial: serials[0].clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.revoked_serials, [serials[0].clone()]);
    let status = client(&ctl, &ops1).await.status(pb::StatusRequest {}).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(status.message().contains("revoked"), "{}", status.message());
    client(&ctl, &ops2).await.status(pb::StatusRequest {}).await.unwrap();
    client(&ctl, &ops3).await.list_agents(pb::ListAgentsRequest::default()).await.unwrap();
    // Revoking it again, or a serial the admin never had, is a clear error.
    let again = admin
        .revoke_admin(pb::RevokeAdminRequest { name: "ops".into(), serial: serials[0].clone() })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition, "{again:?}");
    let foreign = admin
        .revoke_admin(pb::RevokeAdminRequest { name: "ops".into(), serial: serial_of(&watcher) })
        .await
        .unwrap_err();
    assert_eq!(foreign.code(), Code::InvalidArgument, "{foreign:?}");

    // An admin cannot revoke all of their own certificates, nor the one they call with.
    let own = serial_of(&first);
    for serial in [String::new(), own] {
        let status =
            admin.revoke_admin(pb::RevokeAdminRequest { name: "admin".into(), serial }).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }

    // Revoking the name revokes every remaining serial.
    let resp = admin
        .revoke_admin(pb::RevokeAdminRequest { name: "ops".into(), serial: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.revoked_serials.len(), 2);
    for id in [&ops2, &ops3] {
        let status = client(&ctl, id).await.status(pb::StatusRequest {}).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied);
    }
    client(&ctl, &watcher).await.status(pb::StatusRequest {}).await.unwrap();
    ctl.stop().await.unwrap();
}

#[tokio::test]
async fn admins_list_shows_roles_and_serials() {
    let tmp = tempfile::tempdir().unwrap();
    let ctl = controller(tmp.path()).await;
    let first = init_admin(&ctl);
    let ops = add_admin(&ctl, "ops", "approver").await;
    let ops2 = rekey(&ctl, &first, "ops").await.unwrap();
    let mut admin = client(&ctl, &first).await;
    admin.revoke_admin(pb::RevokeAdminRequest { name: "ops".into(), serial: serial_of(&ops) }).await.unwrap();
    let mut list = admin.list_admins(pb::ListAdminsRequest {}).await.unwrap().into_inner().admins;
    list.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(
        list.iter().map(|a| (a.name.as_str(), a.role.as_str())).collect::<Vec<_>>(),
        [("admin", "admin"), ("ops", "approver")]
    );
    assert_eq!(list[0].created_by, "convoy init");
    assert_eq!(list[0].certs.len(), 1);
    assert_eq!(list[0].certs[0].serial, serial_of(&first));
    assert!(!list[0].certs[0].revoked);
    assert_eq!(list[1].created_by, "admin/admin");
    let certs: Vec<_> = list[1].certs.iter().map(|c| (c.serial.clone(), c.revoked)).collect();
    assert_eq!(certs, [(serial_of(&ops), true), (serial_of(&ops2), false)]);
    assert_eq!(list[1].certs[0].revoked_by, "admin/admin");
    assert!(list[1].certs[0].revoked_at_unix > 0 && list[1].certs[1].issued_at_unix > 0);
    ctl.stop().await.unwrap();
}

/// A revoked name as stores from before the registry wrote it.
#[derive(serde::Serialize)]
struct OldRevokedAdmin {
    by: String,
    at: i64,
}

#[tokio::test]
async fn a_store_from_before_the_registry_is_migrated_once() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ctl");
    // A controller directory as the previous code left it: the PKI and config from `convoy
    // init`, a store with names in `revoked_admins` and no admin records at all.
    let ctl = LocalController::start(&dir, LocalOptions::default()).await.unwrap();
    let grpc_addr = ctl.grpc_addr;
    let legacy = minted_outside_registry(&ctl, "legacy");
    let old_ops = minted_outside_registry(&ctl, "old-ops");
    ctl.stop().await.unwrap();
    {
        let store = Store::open(&dir.join("state")).unwrap();
        assert!(store.remove(Tree::Admins, "admin").unwrap());
        store
            .put(
                Tree::RevokedAdmins,
                "old-ops",
                &OldRevokedAdmin { by: "admin/admin".into(), at: 1_700_000_000 },
                true,
            )
            .unwrap();
        assert!(store.list::<serde_json::Value>(Tree::Admins).unwrap().is_empty());
    }

    let opts = || LocalOptions { grpc_addr: Some(grpc_addr), ..Default::default() };
    let ctl = LocalController::start(&dir, opts()).await.unwrap();
    let first = init_admin(&ctl);
    // The first admin keeps working, with role admin and its certificate's serial.
    let mut admin = client(&ctl, &first).await;
    let list = admin.list_admins(pb::ListAdminsRequest {}).await.unwrap().into_inner().admins;
    let by_name = |n: &str| list.iter().find(|a| a.name == n).unwrap().clone();
    let a = by_name("admin");
    assert_eq!((a.role.as_str(), a.created_by.as_str()), ("admin", "migration"));
    assert_eq!(a.certs.iter().map(|c| c.serial.clone()).collect::<Vec<_>>(), [serial_of(&first)]);
    // The revoked name stays taken and has no usable certificate.
    let o = by_name("old-ops");
    assert!(o.certs.is_empty(), "{o:?}");
    assert_eq!(list.len(), 2, "{list:?}");
    let kc = convoy_pki::generate_csr().unwrap();
    let status = admin
        .issue_admin(pb::IssueAdminRequest {
            name: "old-ops".into(),
            csr_der: kc.csr_der,
            role: "viewer".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    // Certificates from the old model that were never recorded are refused.
    for id in [&legacy, &old_ops] {
        let status = client(&ctl, id).await.status(pb::StatusRequest {}).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    }
    // An admin re-adds the legacy admin through the registry.
    let legacy_new = add_admin(&ctl, "legacy", "deployer").await;
    client(&ctl, &legacy_new).await.status(pb::StatusRequest {}).await.unwrap();
    ctl.stop().await.unwrap();

    // Restarting changes nothing: the rule only applies to a store without admin records.
    let ctl = LocalController::start(&dir, opts()).await.unwrap();
    let again =
        client(&ctl, &first).await.list_admins(pb::ListAdminsRequest {}).await.unwrap().into_inner().admins;
    assert_eq!(again.len(), 3);
    assert_eq!(again.iter().find(|a| a.name == "admin").unwrap().certs, a.certs);
    ctl.stop().await.unwrap();
}

/// A caller hammering refused calls with huge arguments cannot grow the audit log without
/// bound: entries are size-capped, refusals past a burst are counted rather than written, and
/// oversized messages are refused before they are decoded.
#[tokio::test]
async fn refused_calls_cannot_flood_the_audit_log() {
    use convoy_controller::logic::audit::{MAX_FIELD_CHARS, REFUSALS_BURST};
    let tmp = tempfile::tempdir().unwrap();
    let ctl = controller(tmp.path()).await;
    let viewer = add_admin(&ctl, "peeker", "viewer").await;
    let mut c = client(&ctl, &viewer).await;
    let huge = "A".repeat(500_000);
    for _ in 0..200 {
        let s = c
            .remove_release(pb::RemoveReleaseRequest { app: huge.clone(), version: "1.0.0".into() })
            .await
            .unwrap_err();
        assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
    }
    let mine = |log: &[serde_json::Value]| -> Vec<serde_json::Value> {
        log.iter().filter(|e| e["actor"] == "admin/peeker").cloned().collect()
    };
    let recorded = mine(&audit(&ctl).await);
    // One second may pass during the loop on a slow machine, topping the allowance up once.
    assert!(
        (REFUSALS_BURST as usize..=REFUSALS_BURST as usize + 2).contains(&recorded.len()),
        "{} refusals recorded of 200",
        recorded.len()
    );
    for e in &recorded {
        let target = e["target"].as_str().unwrap();
        assert!(target.chars().count() < MAX_FIELD_CHARS + 32, "a {}-character target", target.len());
        assert!(target.ends_with("bytes]"), "{target:.40}");
    }
    // Once the rate allows again, the next refusal is recorded with the count it stood for.
    let counted = common::eventually(std::time::Duration::from_secs(10), "a refusal recorded again", || {
        let (ctl, mut c) = (&ctl, c.clone());
        async move {
            let s =
                c.remove_release(pb::RemoveReleaseRequest { app: "x".into(), version: "1.0.0".into() }).await;
            assert_eq!(s.unwrap_err().code(), tonic::Code::PermissionDenied);
            let log = mine(&audit(ctl).await);
            log.iter().find_map(|e| e["params"]["refusals_not_recorded_before"].as_u64())
        }
    })
    .await;
    assert!(counted >= 200 - (REFUSALS_BURST as u64 + 2), "{counted}");
    // A message past the admin limit is refused before it is decoded, and not recorded.
    let before = audit(&ctl).await.len();
    let s = c
        .remove_release(pb::RemoveReleaseRequest { app: "A".repeat(2 << 20), version: "1.0.0".into() })
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::OutOfRange, "{s:?}");
    assert_eq!(audit(&ctl).await.len(), before);
    ctl.stop().await.unwrap();
}

/// A viewer's certificate can rekey its own name, but only up to a few active certificates:
/// a stolen one cannot mint successors without bound. Revoking one makes room again.
#[tokio::test]
async fn an_admin_holds_at_most_a_few_active_certificates() {
    use convoy_controller::logic::admins::MAX_ACTIVE_CERTS;
    let tmp = tempfile::tempdir().unwrap();
    let ctl = controller(tmp.path()).await;
    let viewer = add_admin(&ctl, "ops", "viewer").await;
    let mut minted = vec![viewer.clone()];
    while minted.len() < MAX_ACTIVE_CERTS {
        minted.push(rekey(&ctl, &viewer, "").await.unwrap());
    }
    let refused = rekey(&ctl, &viewer, "").await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("active certificates"), "{}", refused.message());
    client(&ctl, &init_admin(&ctl))
        .await
        .revoke_admin(pb::RevokeAdminRequest { name: "ops".into(), serial: serial_of(&minted[1]) })
        .await
        .unwrap();
    rekey(&ctl, &viewer, "").await.unwrap();
    ctl.stop().await.unwrap();
}

/// Stepping over a freeze is the admins' (who own freezes), not a deployer's; durations an agent
/// would refuse are refused before a rollout starts.
#[tokio::test]
async fn deploy_arguments_beyond_a_deployers_reach_are_refused_up_front() {
    let tmp = tempfile::tempdir().unwrap();
    let ctl = controller(tmp.path()).await;
    let deployer = add_admin(&ctl, "dep", "deployer").await;
    let mut c = client(&ctl, &deployer).await;
    let base = pb::DeployRequest { app: "shop-api".into(), version: "1.0.0".into(), ..Default::default() };
    let s = c
        .deploy(pb::DeployRequest { override_freeze: true, reason: "sale".into(), ..base.clone() })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("needs role admin"), "{}", s.message());
    for long in [
        pb::DeployRequest { health_deadline_ms: 2 * 86_400_000, ..base.clone() },
        pb::DeployRequest { bake_ms: u64::MAX, ..base.clone() },
    ] {
        let s = c.deploy(long).await.unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
        assert!(s.message().contains("longer than 1day"), "{}", s.message());
    }
    let log = audit(&ctl).await;
    assert!(
        log.iter().any(
            |e| e["action"] == "freeze.override" && e["outcome"].as_str().unwrap().starts_with("refused")
        ),
        "the refusal is audited"
    );
    ctl.stop().await.unwrap();
}

/// A freeze past the year 9999 is refused, so nothing later fails to show it (a deploy
/// refused by a freeze names its end).
#[tokio::test]
async fn freezes_past_the_year_9999_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let ctl = controller(tmp.path()).await;
    let mut c = client(&ctl, &init_admin(&ctl)).await;
    let now = convoy_controller::time::now();
    for (from, to) in [(now, i64::MAX), (now, 253_402_300_800), (-5, now)] {
        let s = c
            .freeze(pb::FreezeRequest {
                action: pb::FreezeAction::Add as i32,
                from_unix: from,
                to_unix: to,
                reason: "sale".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{from}..{to}: {s:?}");
        assert!(s.message().contains("9999"), "{}", s.message());
    }
    ctl.stop().await.unwrap();
}
