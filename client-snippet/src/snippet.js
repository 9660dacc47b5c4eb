/* Consent banner + preference center. No runtime dependencies; see build.mjs.
 * __CSS__ is replaced at build time by the minified src/snippet.css.
 * Server strings never reach innerHTML: the DOM is built with createElement,
 * setAttribute and text nodes only. Short internal names keep the size budget. */
((w, d) => {
  const S = d.currentScript || d.querySelector("script[data-key]");
  if (!S || w.Consent) return;
  const A = (k) => S.getAttribute("data-" + k);
  const K = A("key");
  const API = (A("api") || new URL(S.src).origin).replace(/\/+$/, "");
  const TOK = A("subject-token");
  const DOM = A("cookie-domain");
  const GCM = A("gcm") == "1";
  const NONCE = A("nonce") || S.nonce;
  const G = navigator.globalPrivacyControl === true;
  const enc = encodeURIComponent;
  const Q = "cns_q_" + K; // outbox (JSON bodies as strings)
  const LANG = d.documentElement.lang;
  const CK = "cns_cfg_" + K + "_" + LANG; // {e: etag, b: config body}
  const inf = new Set();
  const on = (t, e, f) => t.addEventListener(e, f);
  let cfg, T, st = {}, ban, pc, po, opener, css;

  /* storage: localStorage; when unusable, state lives only in memory (st) and
     choices are still sent once */
  const sg = (k) => {
    try {
      return JSON.parse(localStorage.getItem(k));
    } catch (e) {}
  };
  const sp = (k, v) => {
    try {
      localStorage.setItem(k, JSON.stringify(v));
    } catch (e) {}
  };
  const rid = () =>
    Array.from(crypto.getRandomValues(new Uint32Array(4)), (n) => n.toString(36)).join("");
  const gtag = (x, a, n = a) =>
    GCM && typeof w.gtag == "function" &&
    w.gtag("consent", x, { ad_storage: a, ad_user_data: a, ad_personalization: a, analytics_storage: n });
  const each = (f) => cfg.purposes.forEach(f);
  const isC = (p) => p.kind == "consent";
  const rd = (f) => (d.body ? f() : on(d, "DOMContentLoaded", f));

  /* identity: the first-party cookie wins (it may be shared via data-cookie-domain) */
  const aid =
    (d.cookie.match(/(?:^|;\s*)consent_aid=([\w-]+)/) || [])[1] || sg("cns_aid") || "a_" + rid();
  sp("cns_aid", aid);
  d.cookie =
    "consent_aid=" + aid + ";path=/;max-age=31536000;SameSite=Lax" +
    (location.protocol == "https:" ? ";Secure" : "") +
    (DOM ? ";domain=" + DOM : "");

  /* stored answers: st = {purpose: {decision, ask}} per tenant */
  const stale = (p) => {
    const x = st[p.key];
    return !x || x.ask != p.ask;
  };
  // an answer given for an older ask label no longer counts; under GPC a grant counts
  // only if it was given while the signal was on (the signal wins over an earlier opt-in)
  const get = (k) => {
    const x = st[k], p = cfg && cfg.purposes.find((p) => p.key == k);
    return x && (!p || (p.ask == x.ask && !(G && p.gpc && !x.g && x.decision == "granted")))
      ? x.decision
      : null;
  };

  /* outbox: a body is queued before it is sent and dropped only after a 2xx
     or a permanent 4xx (not 408/429); idempotency keys make re-sends harmless */
  const send = (b) => {
    if (inf.has(b)) return;
    inf.add(b);
    // a string body goes out as text/plain;charset=UTF-8: no CORS preflight
    fetch(API + "/v1/snippet/consents?key=" + enc(K), { method: "POST", body: b, keepalive: true })
      .then((r, s = r.status) => {
        (r.ok || (s > 399 && s < 500 && s != 408 && s != 429)) &&
          sp(Q, (sg(Q) || []).filter((x) => x != b));
      }, () => 0)
      .then(() => inf.delete(b));
  };
  const flush = () => (sg(Q) || []).forEach(send);

  /* <script type="text/plain" data-consent="purpose"> runs once granted */
  const act = () =>
    d.querySelectorAll('script[type="text/plain"][data-consent]').forEach((o) => {
      if (get(o.dataset.consent) == "granted") {
        const n = d.createElement("script");
        for (const a of o.attributes) a.name != "type" && n.setAttribute(a.name, a.value);
        n.nonce = o.nonce;
        n.async = o.hasAttribute("async");
        n.text = o.text;
        o.replaceWith(n);
      }
    });

  // Consent Mode: granted only if every matching purpose is granted
  const gu = (f) =>
    gtag(
      "update",
      (f = (r, ps = cfg.purposes.filter((p) => r.test(p.key))) =>
        ps[0] && ps.every((p) => get(p.key) == "granted") ? "granted" : "denied")(
        /(^|_)ads?(_|$)|advert|market/i
      ),
      f(/analytic|statistic|measure/i)
    );

  const emit = (m = {}) => {
    each((p) => (m[p.key] = get(p.key)));
    d.dispatchEvent(new CustomEvent("consent:change", { detail: m }));
    act();
    gu();
  };

  /* record {purpose: decision}: only new, changed or re-asked answers are sent */
  const rec = (m, ch = []) => {
    each((p) => {
      const v = m[p.key];
      if (v && (stale(p) || st[p.key].decision != v)) {
        st[p.key] = { decision: v, ask: p.ask, g: G };
        ch.push({ purpose: p.key, decision: v, idempotency_key: rid() });
      }
    });
    if (ch[0]) {
      sp("cns_st_" + cfg.tenant, st);
      const b = JSON.stringify({
        anonymous_id: aid,
        subject_token: TOK || undefined,
        policy: cfg.policy.key,
        policy_version: cfg.policy.version,
        gpc: G,
        choices: ch,
      });
      sp(Q, [...(sg(Q) || []), b]);
      send(b);
      emit();
    }
  };

  /* DOM: attributes via setAttribute, children as text nodes (falsy skipped) */
  const h = (t, a, ...k) => {
    const e = d.createElement(t);
    for (const n in a) e.setAttribute(n, a[n]);
    e.append(...k.filter((x) => x));
    return e;
  };
  const btn = (k, l, f, s) => {
    const b = h("button", { type: "button", class: s ? "cns-s" : "", "data-cns": k }, l);
    b.onclick = f;
    return b;
  };
  const ui = (id, a, ...k) => {
    if (!css) {
      css = h("style", { id: "cns-css" }, __CSS__);
      NONCE && css.setAttribute("nonce", NONCE);
      (d.head || d.documentElement).append(css);
    }
    return h("div", { id: "cns-" + id, class: "cns-ui", role: "dialog", ...a }, ...k);
  };
  const cookies = (c = cfg.cookies || []) =>
    c[0] &&
    h(
      "details",
      0,
      h("summary", 0, T.cookies_heading),
      h(
        "ul",
        0,
        ...c.map((x) =>
          h(
            "li",
            0,
            h("b", 0, x.name),
            ": " +
              [
                x.provider,
                x.http_only && "HttpOnly",
                x.secure && "Secure",
                x.same_site && "SameSite=" + x.same_site,
                x.lifetime == "session" ? T.session_lifetime || "ends at sign-out" : x.lifetime,
                x.description,
              ]
                .filter((v) => v)
                .join(", ")
          )
        )
      )
    );

  const done = (m) => {
    rec(m);
    ban && ban.remove();
    ban = 0;
    close(1);
  };
  // accept all never opts in a gpc purpose while GPC is on (it stays denied)
  const all = (v) => () => {
    const m = {};
    each((p) => (m[p.key] = isC(p) ? (v < "e" || !(G && p.gpc)) && v : "acknowledged"));
    done(m);
  };

  const banner = () => {
    const u = cfg.policy.url, c = cfg.purposes.some((p) => isC(p) && !(G && p.gpc));
    ban = ui(
      "banner",
      { "aria-labelledby": "cns-bt", "aria-describedby": "cns-bd" },
      h("h2", { id: "cns-bt" }, T.title),
      h(
        "p",
        { id: "cns-bd" },
        T.body,
        " ",
        // only http(s) policy links; link text from optional texts.policy
        /^https?:\/\//i.test(u) && h("a", { href: u, target: "_blank", rel: "noopener" }, T.policy || "Privacy policy")
      ),
      cookies(),
      h(
        "div",
        { class: "cns-r" },
        // nothing left to ask (e.g. all consent purposes GPC-denied): acknowledge
        btn("accept", c ? T.accept_all : T.acknowledge, all("granted")),
        c && btn("reject", T.reject_all, all("denied")),
        btn("prefs", T.settings, open, 1)
      )
    );
    on(ban, "keydown", (e) => e.key == "Escape" && (ban.hidden = true));
    // first in <body> so keyboard users reach it first; fixed, so no layout shift
    rd(() => d.body.prepend(ban));
  };

  const focusables = () => pc.querySelectorAll("input,button,summary,a[href]");
  const close = (c) => {
    if (pc) {
      pc.remove();
      pc = 0;
      if (ban && !c) ban.hidden = false;
      opener && opener.isConnected && opener.focus();
    }
  };
  const save = () => {
    const m = {};
    each((p) => (m[p.key] = "acknowledged"));
    pc.querySelectorAll("input").forEach((i) => (m[i.dataset.cnsPurpose] = i.checked ? "granted" : "denied"));
    done(m);
  };

  function open() {
    if (!cfg) return (po = 1);
    if (pc) return;
    opener = d.activeElement;
    if (ban) ban.hidden = true;
    pc = ui(
      "prefs",
      { "aria-modal": "true", "aria-labelledby": "cns-pt", tabindex: "-1" },
      h(
        "div",
        { class: "cns-pn" },
        h("h2", { id: "cns-pt" }, T.settings),
        G && h("p", 0, T.gpc_notice),
        ...cfg.purposes.map((p) => {
          const id = "cns-p-" + p.key;
          const i = isC(p) && h("input", { type: "checkbox", "data-cns-purpose": p.key, "aria-describedby": id });
          // ticked only to show the visitor's own earlier grant, never by default
          if (i) i.checked = get(p.key) == "granted";
          return h("div", { class: "cns-i" }, h(i ? "label" : "b", 0, i, p.title), h("p", { id }, p.description));
        }),
        cookies(),
        h("div", { class: "cns-r" }, btn("save", T.save, save), btn("close", T.close, () => close(), 1))
      )
    );
    on(pc, "keydown", (e) => {
      if (e.key == "Escape") {
        e.stopPropagation();
        close();
      } else if (e.key == "Tab") {
        const f = focusables(), a = f[0], z = f[f.length - 1], x = d.activeElement;
        if (e.shiftKey ? x == a || x == pc : x == z) {
          e.preventDefault();
          (e.shiftKey ? z : a).focus();
        }
      }
    });
    rd(() => {
      d.body.append(pc);
      focusables()[0].focus();
    });
  }

  const use = (b) => {
    cfg = b;
    T = b.texts || {};
    st = sg("cns_st_" + b.tenant) || {};
    act();
    gu();
  };

  gtag("default", "denied");
  const C = sg(CK);
  C && use(C.b); // apply stored answers before the network answers
  flush();
  on(w, "online", flush);
  on(w, "pagehide", flush);
  on(d, "DOMContentLoaded", act);
  on(d, "click", (e) => {
    e.target.closest && e.target.closest("[data-consent-open]") && (e.preventDefault(), open());
  });

  w.Consent = {
    get,
    // listeners ride on the DOM event, so one that throws cannot break others
    on: (e, f) => on(d, "consent:" + e, (x) => f(x.detail)),
    open,
    ready: fetch(API + "/v1/snippet/config?key=" + enc(K) + "&lang=" + enc(LANG), {
      headers: C && C.e ? { "If-None-Match": C.e } : {},
    })
      .then((r) =>
        r.status == 304 && C
          ? C.b
          : r.ok
          ? r.json().then((b) => (sp(CK, { e: r.headers.get("ETag"), b }), b))
          : C && C.b
      )
      .catch(() => C && C.b)
      .then((b, m = {}) => {
        if (b) {
          use(b);
          // GPC: a denial once per purpose + ask label (also over an earlier opt-in), never asked
          G && each((p) => isC(p) && p.gpc && !get(p.key) && (m[p.key] = "denied"));
          rec(m);
          cfg.purposes.some(stale) && banner();
          po && open();
        }
      }),
  };
})(window, document);
