//! Device groups through the API, on every backend: static membership, dynamic groups that
//! follow tags live, previews, and the refusals.

use axum::http::{Method, StatusCode};
use serde_json::{Value, json};

use crate::devices::{accepted_devices, all_pages, enc};
use crate::each_backend;
use crate::support::TestApp;

async fn create_group(app: &TestApp, token: &str, body: Value) -> crate::support::Resp {
    app.call(Method::POST, "/api/v1/groups", Some(token), Some(body)).await
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// Tried: filters that do not parse (create and update, with the column), a static group
/// with a filter, a dynamic group without one, a filter naming a dynamic group.
#[tokio::test]
async fn a_dynamic_group_follows_the_devices_tags() {
    each_backend!(|app| {
        let operator = app.token("operator").await;
        let viewer = app.token("viewer").await;
        let ids = accepted_devices(&app, "DYN", 3).await;
        for id in &ids[..2] {
            let r = app
                .call(
                    Method::PUT,
                    &format!("/api/v1/devices/{id}/tags"),
                    Some(&operator),
                    Some(json!({"tags": {"region": "eu"}})),
                )
                .await;
            assert_eq!(r.status, StatusCode::OK);
        }
        let r =
            create_group(&app, &operator, json!({"name": "Europe", "kind": "dynamic", "filter": "tag.region = eu"}))
                .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let gid = r.body["id"].as_str().unwrap().to_string();
        let members_url = format!("/api/v1/groups/{gid}/devices?limit=1&sort=id");
        assert_eq!(sorted(all_pages(&app, &viewer, &members_url).await), sorted(ids[..2].to_vec()));
        let g = app.call(Method::GET, &format!("/api/v1/groups/{gid}"), Some(&viewer), None).await;
        assert_eq!((g.body["kind"].as_str(), g.body["device_count"].as_u64()), (Some("dynamic"), Some(2)));

        // Moving a device to another region moves it out of the group; tagging one moves it in.
        app.call(
            Method::PATCH,
            &format!("/api/v1/devices/{}/tags", ids[0]),
            Some(&operator),
            Some(json!({"set": {"region": "us"}})),
        )
        .await;
        app.call(
            Method::PATCH,
            &format!("/api/v1/devices/{}/tags", ids[2]),
            Some(&operator),
            Some(json!({"set": {"region": "eu"}})),
        )
        .await;
        assert_eq!(sorted(all_pages(&app, &viewer, &members_url).await), sorted(vec![ids[1].clone(), ids[2].clone()]));
        let d = app.call(Method::GET, &format!("/api/v1/devices/{}", ids[2]), Some(&viewer), None).await;
        assert_eq!(d.body["groups"], json!([{"id": gid, "name": "Europe", "kind": "dynamic"}]));
        let d = app.call(Method::GET, &format!("/api/v1/devices/{}", ids[0]), Some(&viewer), None).await;
        assert_eq!(d.body["groups"], json!([]));

        // The list query narrows a group's devices further.
        let url = format!("/api/v1/groups/{gid}/devices?filter={}", enc(&format!("id = \"{}\"", ids[2])));
        assert_eq!(all_pages(&app, &viewer, &url).await, [ids[2].clone()]);

        // Changing the filter re-evaluates at once, and is checked.
        let r = app
            .call(
                Method::PATCH,
                &format!("/api/v1/groups/{gid}"),
                Some(&operator),
                Some(json!({"filter": "tag.region in (eu, us)"})),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(sorted(all_pages(&app, &viewer, &members_url).await), sorted(ids.clone()));
        let r = app
            .call(
                Method::PATCH,
                &format!("/api/v1/groups/{gid}"),
                Some(&operator),
                Some(json!({"filter": "tag.region in eu"})),
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert_eq!(r.body["error"]["message"], "invalid filter: expected '(' after 'in', found 'eu' at column 15");
        assert_eq!(
            sorted(all_pages(&app, &viewer, &members_url).await),
            sorted(ids.clone()),
            "the bad filter was not saved"
        );

        let bad = [
            (
                json!({"name": "x", "kind": "dynamic", "filter": "tag.region = "}),
                "expected a value after '=' at column 14",
            ),
            (json!({"name": "x", "kind": "dynamic", "filter": "online and"}), "at column 11"),
            (json!({"name": "x", "kind": "dynamic"}), "needs a filter"),
            (json!({"name": "x", "kind": "static", "filter": "online"}), "no filter"),
            (json!({"name": "x", "kind": "dynamic", "filter": "group = Europe"}), "is dynamic"),
            (json!({"name": " ", "kind": "static"}), "invalid group name"),
        ];
        for (body, want) in bad {
            let r = create_group(&app, &operator, body.clone()).await;
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}: {}", r.text);
            assert!(r.text.contains(want), "{want:?} in {}", r.text);
        }

        // The preview (viewers too): a count and the newest devices.
        let r = app
            .call(
                Method::GET,
                &format!("/api/v1/groups/preview?filter={}", enc("tag.region = eu")),
                Some(&viewer),
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.body["count"], 2);
        assert_eq!(r.body["devices"][0]["id"], ids[2].as_str(), "newest first");
        let r = app
            .call(Method::GET, &format!("/api/v1/groups/preview?filter={}", enc("tag.region ~")), Some(&viewer), None)
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert!(r.text.contains("column 13"), "{}", r.text);

        let audit = app.admin(Method::GET, &format!("/api/v1/audit?target_id={gid}"), None).await;
        let actions: Vec<&str> =
            audit.body["items"].as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
        assert_eq!(actions, ["group.update", "group.create"]);
    });
}

/// Tried: unknown device ids among known ones, adding to a dynamic group, removing a device
/// that is not a member, a taken name, deleting a group a filter names, a viewer.
#[tokio::test]
async fn static_groups_add_and_remove_all_or_nothing() {
    each_backend!(|app| {
        let operator = app.token("operator").await;
        let viewer = app.token("viewer").await;
        let ids = accepted_devices(&app, "STA", 5).await;
        let r = create_group(
            &app,
            &operator,
            json!({"name": "canary", "kind": "static", "description": "first to update"}),
        )
        .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let gid = r.body["id"].as_str().unwrap().to_string();
        let add = |devices: Vec<String>, token: String| {
            let app = &app;
            let url = format!("/api/v1/groups/{gid}/devices");
            async move { app.call(Method::POST, &url, Some(&token), Some(json!({"devices": devices}))).await }
        };

        let before = app.audit_count().await;
        let r = add(vec![ids[0].clone(), "ghost-1".into(), ids[1].clone(), "ghost-2".into()], operator.clone()).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text);
        assert!(r.text.contains("\\\"ghost-1\\\"") && r.text.contains("\\\"ghost-2\\\""), "names them: {}", r.text);
        assert!(r.text.contains("nothing added"));
        let r = add(vec![ids[0].clone()], viewer.clone()).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        assert_eq!(app.audit_count().await, before);
        let url = format!("/api/v1/groups/{gid}/devices?limit=2");
        assert!(all_pages(&app, &viewer, &url).await.is_empty(), "nothing was added");

        let r = add(ids[..4].to_vec(), operator.clone()).await;
        assert_eq!(r.body, json!({"added": 4, "already": 0}), "{}", r.text);
        let r = add(vec![ids[3].clone(), ids[4].clone(), ids[4].clone()], operator.clone()).await;
        assert_eq!(r.body, json!({"added": 1, "already": 1}), "{}", r.text);
        let got = all_pages(&app, &viewer, &format!("{url}&sort=-created_at")).await;
        let mut want = ids.clone();
        want.reverse();
        assert_eq!(got, want, "every member once, newest first, over 3 pages");

        let r =
            app.call(Method::DELETE, &format!("/api/v1/groups/{gid}/devices/{}", ids[1]), Some(&operator), None).await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
        let r =
            app.call(Method::DELETE, &format!("/api/v1/groups/{gid}/devices/{}", ids[1]), Some(&operator), None).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        let g = app.call(Method::GET, &format!("/api/v1/groups/{gid}"), Some(&viewer), None).await;
        assert_eq!(g.body["device_count"], 4);
        let d = app.call(Method::GET, &format!("/api/v1/devices/{}", ids[0]), Some(&viewer), None).await;
        assert_eq!(d.body["groups"], json!([{"id": gid, "name": "canary", "kind": "static"}]));

        // A filter can use static membership; such a group cannot then go away or be renamed.
        let r = create_group(
            &app,
            &operator,
            json!({"name": "canary-online", "kind": "dynamic", "filter": "group = canary and not online"}),
        )
        .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let dyn_id = r.body["id"].as_str().unwrap().to_string();
        let r = app.call(Method::GET, &format!("/api/v1/groups/{dyn_id}"), Some(&viewer), None).await;
        assert_eq!(r.body["device_count"], 4);
        let r = app
            .call(
                Method::POST,
                &format!("/api/v1/groups/{dyn_id}/devices"),
                Some(&operator),
                Some(json!({"devices": [ids[1]]})),
            )
            .await;
        assert_eq!(r.status, StatusCode::CONFLICT);
        let r = app.call(Method::DELETE, &format!("/api/v1/groups/{gid}"), Some(&operator), None).await;
        assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.text);
        assert!(r.text.contains("canary-online"));
        let r = app
            .call(Method::PATCH, &format!("/api/v1/groups/{gid}"), Some(&operator), Some(json!({"name": "birds"})))
            .await;
        assert_eq!(r.status, StatusCode::CONFLICT);
        let r = create_group(&app, &operator, json!({"name": "canary", "kind": "static"})).await;
        assert_eq!(r.status, StatusCode::CONFLICT);

        let groups = app.call(Method::GET, "/api/v1/groups?limit=1", Some(&viewer), None).await;
        assert_eq!(groups.body["items"][0]["name"], "canary");
        let groups = app
            .call(
                Method::GET,
                &format!("/api/v1/groups?limit=1&cursor={}", groups.body["next_cursor"].as_str().unwrap()),
                Some(&viewer),
                None,
            )
            .await;
        assert_eq!(groups.body["items"][0]["name"], "canary-online");
        assert!(groups.body.get("next_cursor").is_none());

        let r = app.call(Method::DELETE, &format!("/api/v1/groups/{dyn_id}"), Some(&operator), None).await;
        assert_eq!(r.status, StatusCode::NO_CONTENT);
        let r = app.call(Method::DELETE, &format!("/api/v1/groups/{gid}"), Some(&viewer), None).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        let r = app.call(Method::DELETE, &format!("/api/v1/groups/{gid}"), Some(&operator), None).await;
        assert_eq!(r.status, StatusCode::NO_CONTENT);
        let d = app.call(Method::GET, &format!("/api/v1/devices/{}", ids[0]), Some(&viewer), None).await;
        assert_eq!(d.body["groups"], json!([]));
        let actions: Vec<String> =
            app.admin(Method::GET, "/api/v1/audit?action=group.&limit=50", None).await.body["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["action"].as_str().unwrap().to_string())
                .collect();
        for a in ["group.create", "group.add_devices", "group.remove_device", "group.delete"] {
            assert!(actions.iter().any(|x| x == a), "{a} in {actions:?}");
        }
    });
}
