//! Tracing: one span per session carrying `session_id` and `harvester_id`, a `resource`
//! span per attempt inside it, and monitor ticks as root spans of their own.

mod common;

use std::sync::{Arc, Mutex};

use common::{FinalizerMode, Recorder, config, finished, supervisor};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

#[derive(Debug, Clone)]
struct SeenSpan {
    name: &'static str,
    fields: Vec<(String, String)>,
    parent: Option<&'static str>,
}

#[derive(Clone, Default)]
struct Spans(Arc<Mutex<Vec<SeenSpan>>>);

struct Fields<'a>(&'a mut Vec<(String, String)>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.push((field.name().to_owned(), format!("{value:?}")));
    }
}

impl<S: tracing::Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Spans {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = Vec::new();
        attrs.record(&mut Fields(&mut fields));
        let parent = ctx.span(id).and_then(|s| s.parent()).map(|p| p.name());
        self.0.lock().expect("spans").push(SeenSpan {
            name: attrs.metadata().name(),
            fields,
            parent,
        });
    }
}

impl SeenSpan {
    fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

#[tokio::test(start_paused = true)]
async fn each_session_has_one_span_with_its_ids_and_attempts_nest_inside_it() {
    let spans = Spans::default();
    let subscriber = tracing_subscriber::registry()
        .with(spans.clone())
        .with(tracing_subscriber::filter::LevelFilter::DEBUG);
    let _guard = tracing::subscriber::set_default(subscriber);

    let rec = Recorder::new(FinalizerMode::Ok);
    let sup = supervisor(config(), &rec).await;
    let id = sup
        .start_session("csw", ["sleep130-1", "ok-2"])
        .await
        .expect("start");
    finished(&sup, id).await;
    sup.shutdown().await.expect("shutdown");

    let seen = spans.0.lock().expect("spans").clone();
    let sessions: Vec<_> = seen.iter().filter(|s| s.name == "session").collect();
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    assert_eq!(
        sessions[0].field("session_id"),
        Some(id.to_string().as_str())
    );
    assert_eq!(sessions[0].field("harvester_id"), Some("csw"));

    let resources: Vec<_> = seen.iter().filter(|s| s.name == "resource").collect();
    assert_eq!(resources.len(), 2);
    assert!(resources.iter().all(|s| s.parent == Some("session")));
    assert!(
        resources
            .iter()
            .any(|s| s.field("resource_id") == Some("sleep130-1"))
    );

    let ticks: Vec<_> = seen.iter().filter(|s| s.name == "monitor_tick").collect();
    // A monitor wakes on its first tick and for its `MonitorTick` event (every 60 s), not
    // between (the clock reads the store for it, in a batch).
    assert!(
        ticks.len() >= 2,
        "the 130 s resource outlived the first tick and a MonitorTick one (5 s interval)"
    );
    assert!(
        ticks.iter().all(|s| s.parent.is_none()),
        "ticks are root spans"
    );
}
