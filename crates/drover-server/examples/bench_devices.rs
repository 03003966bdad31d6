//! Device-registry listing benchmark: seeds N devices (default 100,000) with tags, inventory
//! attributes and presence straight into the database, then times the listing queries the
//! API runs. Run through `scripts/bench-devices.sh`.
//!
//!   bench_devices sqlite:///tmp/x.db?mode=rwc [N]
//!   bench_devices 'postgres://postgres@127.0.0.1:5432/test?options=-c%20search_path%3Dbench' [N]

use std::time::Instant;

use drover_proto::api::{CreateGroup, DeviceListQuery, GroupKind};
use drover_server::auth::Principal;
use drover_server::db::Db;

const FILTER: &str = r#"tag.region = "eu" and attr.arch = "aarch64" and online"#;

fn stats(mut ms: Vec<f64>) -> String {
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    format!("median {:>7.2} ms  min {:>7.2}  max {:>7.2}  (n={})", ms[ms.len() / 2], ms[0], ms[ms.len() - 1], ms.len())
}

async fn time<F, Fut, T>(runs: usize, mut f: F) -> (String, T)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let mut out = None;
    let mut ms = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        out = Some(f().await);
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    (stats(ms), out.unwrap())
}

/// A small deterministic generator, so both engines get the same fleet.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

async fn seed(db: &Db, org: &str, n: usize) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let base = 1_700_000_000_000i64;
    let batch = 500;
    let mut i = 0;
    while i < n {
        let end = (i + batch).min(n);
        let mut dev_rows = Vec::new();
        let mut tag_rows = Vec::new();
        let mut attr_rows = Vec::new();
        for k in i..end {
            let id = format!("{:08x}-0000-7000-8000-{:012x}", k / 1000, k);
            let online = rng.below(3) == 0;
            let seen = if rng.below(10) == 0 { None } else { Some(base + rng.below(86_400_000) as i64) };
            let status = if rng.below(50) == 0 { "pending" } else { "accepted" };
            let identity = format!(
                r#"{{"mac":"02:00:{:02x}:{:02x}:{:02x}:{:02x}","serial":"SN-{k:07}"}}"#,
                (k >> 24) & 255,
                (k >> 16) & 255,
                (k >> 8) & 255,
                k & 255
            );
            dev_rows.push((id.clone(), status, identity, base + k as i64, i64::from(online), seen));
            let region = ["eu", "us", "ap"][rng.below(3) as usize];
            tag_rows.push((id.clone(), "region", region.to_string()));
            tag_rows.push((id.clone(), "site", format!("site-{}", rng.below(50))));
            if rng.below(4) == 0 {
                tag_rows.push((id.clone(), "channel", "beta".to_string()));
            }
            let arch = if rng.below(2) == 0 { "aarch64" } else { "x86_64" };
            attr_rows.push((id.clone(), "arch", arch.to_string()));
            attr_rows.push((id.clone(), "os", format!("debian {}", 11 + rng.below(3))));
            attr_rows.push((id.clone(), "kernel", format!("6.1.{}", rng.below(100))));
            attr_rows.push((id.clone(), "mem_mb", format!("{}", 512 << rng.below(4))));
            attr_rows.push((id.clone(), "agent", "drover-agent 0.1.0".to_string()));
        }
        let mut tx = db.begin_write().await.unwrap();
        let mut sql = String::from(
            "INSERT INTO devices (id, org_id, status, identity, identity_hash, key_fingerprint, csr_pem, enrolled_via, \
             created_at, updated_at, online, last_seen_at) VALUES ",
        );
        for (j, _) in dev_rows.iter().enumerate() {
            let p = j * 6;
            if j > 0 {
                sql.push(',');
            }
            sql.push_str(&format!(
                "(${}, '{org}', ${}, ${}, ${}, ${}, '', 'preauthorized', ${}, ${}, ${}, ${})",
                p + 1,
                p + 2,
                p + 3,
                p + 1,
                p + 1,
                p + 4,
                p + 4,
                p + 5,
                p + 6
            ));
        }
        let mut q = sqlx::query(&sql);
        for (id, status, identity, created, online, seen) in dev_rows {
            q = q.bind(id).bind(status).bind(identity).bind(created).bind(online).bind(seen);
        }
        q.execute(tx.conn()).await.unwrap();
        for (table, rows) in [("device_tags", tag_rows), ("device_attributes", attr_rows)] {
            for chunk in rows.chunks(1000) {
                let marks: Vec<String> =
                    (0..chunk.len()).map(|j| format!("(${}, ${}, ${})", j * 3 + 1, j * 3 + 2, j * 3 + 3)).collect();
                let sql = format!("INSERT INTO {table} (device_id, key, value) VALUES {}", marks.join(","));
                let mut q = sqlx::query(&sql);
                for (d, k, v) in chunk {
                    q = q.bind(d.clone()).bind(k.to_string()).bind(v.clone());
                }
                q.execute(tx.conn()).await.unwrap();
            }
        }
        tx.commit().await.unwrap();
        i = end;
    }
    // Statistics for the planner; on PostgreSQL also the visibility map (otherwise
    // autovacuum starts on the fresh tables in the middle of the timings).
    let analyze = match db.backend() {
        drover_server::db::Backend::Sqlite => "ANALYZE",
        drover_server::db::Backend::Postgres => "VACUUM ANALYZE",
    };
    sqlx::raw_sql(analyze).execute(db.pool()).await.unwrap();
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let url = args.next().expect("usage: bench_devices DATABASE_URL [DEVICES]");
    let n: usize = args.next().map(|s| s.parse().unwrap()).unwrap_or(100_000);
    let db = Db::open(&url).await.unwrap();
    drover_server::ops::bootstrap(&db, Some("benchmark-password".into())).await.unwrap();
    let org = drover_server::ops::find_org(&db, None).await.unwrap();
    let p = Principal::cli(&org);
    let (have,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM devices").fetch_one(db.pool()).await.unwrap();
    if have == 0 {
        let t = Instant::now();
        seed(&db, &org, n).await;
        println!("seeded {n} devices (2.3 tags, 5 attributes each) in {:.1} s", t.elapsed().as_secs_f64());
    }
    println!("engine: {}", db.backend().name());
    let runs = 20;
    let list = |q: DeviceListQuery| {
        let (db, p) = (db.clone(), p.clone());
        move || {
            let (db, p, q) = (db.clone(), p.clone(), q.clone());
            async move { drover_server::devices::list_devices(&db, &p, &q).await.unwrap() }
        }
    };
    let q = |f: &dyn Fn(&mut DeviceListQuery)| {
        let mut q = DeviceListQuery { limit: Some(50), ..Default::default() };
        f(&mut q);
        q
    };

    let (s, page) = time(runs, list(q(&|_| {}))).await;
    println!("first page, newest first (50)                  {s}");
    assert_eq!(page.items.len(), 50);

    // A cursor half way through the fleet (reached untimed, 500 at a time).
    let mut cursor = None;
    for _ in 0..(n / 2 / 500) {
        let page = drover_server::devices::list_devices(
            &db,
            &p,
            &DeviceListQuery { limit: Some(500), cursor: cursor.clone(), ..Default::default() },
        )
        .await
        .unwrap();
        cursor = page.next_cursor;
    }
    let (s, page) = time(runs, list(q(&|q| q.cursor = cursor.clone()))).await;
    println!("deep page (after {:>6} devices)                {s}", n / 2);
    assert_eq!(page.items.len(), 50);

    let (s, page) = time(runs, list(q(&|q| q.filter = Some(FILTER.into())))).await;
    println!("filter, first page                             {s}");
    assert_eq!(page.items.len(), 50);
    let (s, _) = time(runs, list(q(&|q| q.sort = Some("-last_seen_at".into())))).await;
    println!("sort -last_seen_at, first page                 {s}");
    let (s, _) = time(runs, list(q(&|q| q.sort = Some("id".into())))).await;
    println!("sort id, first page                            {s}");
    let (s, _) = time(runs, list(q(&|q| q.online = Some(true)))).await;
    println!("online=true, first page                        {s}");
    let (s, page) = time(runs, list(q(&|q| q.q = Some("sn-0099999".into())))).await;
    println!("q= serial substring (full scan)                {s}");
    assert!(n < 100_000 || page.items.len() == 1);
    let rare = r#"tag.channel = beta and attr.mem_mb = "4096" and tag.site = "site-7""#;
    let (s, _) = time(runs, list(q(&|q| q.filter = Some(rare.into())))).await;
    println!("rare filter (~0.1%), first page                {s}");

    let g = match drover_server::groups::create(
        &db,
        &p,
        CreateGroup {
            name: "eu-arm-online".into(),
            kind: GroupKind::Dynamic,
            filter: Some(FILTER.into()),
            description: String::new(),
        },
    )
    .await
    {
        Ok(g) => g,
        Err(_) => {
            let all = drover_server::groups::list(&db, &p, &Default::default()).await.unwrap();
            all.items.into_iter().find(|g| g.name == "eu-arm-online").unwrap()
        }
    };
    let (s, g) = time(runs, || {
        let (db, p, id) = (db.clone(), p.clone(), g.id.clone());
        async move { drover_server::groups::get(&db, &p, &id).await.unwrap() }
    })
    .await;
    println!("dynamic group member count ({:>5} members)     {s}", g.device_count.unwrap());
    let (s, _) = time(runs, || {
        let (db, p, id) = (db.clone(), p.clone(), g.id.clone());
        async move { drover_server::groups::devices(&db, &p, &id, &DeviceListQuery::default()).await.unwrap() }
    })
    .await;
    println!("dynamic group devices, first page              {s}");
    let (s, _) = time(runs, || {
        let (db, p) = (db.clone(), p.clone());
        async move { drover_server::groups::preview(&db, &p, FILTER).await.unwrap() }
    })
    .await;
    println!("group preview (count + 20 devices)             {s}");
    db.close().await;
}
