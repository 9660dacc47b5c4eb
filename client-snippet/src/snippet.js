/* Consent banner + preference centre. No runtime dependencies; see build.mjs.
 * The stylesheet (src/snippet.css, inlined by the build) is adopted as a constructable
 * stylesheet: no <style> element, so a strict `style-src` does not block it, and the script's
 * SRI hash covers it. Every word comes from the
 * config (the tenant's texts). Server strings never reach innerHTML: the DOM is built with
 * createElement, setAttribute and text nodes only. Short internal names keep the size budget. */
// EK, E: the publishable key and the config a per-tenant script (/v1/snippet/{key}.js) passes in
((w, d, EK, E) => {
  const S = d.currentScript;
  const stub = w.Consent;
  if (!S || (stub && !stub.q)) return;
  const A = (k) => S.getAttribute("data-" + k);
  const B = (k) => A(k) == "1";
  const K = EK || A("key");
  const API = A("api") || new URL(S.src).origin;
  const TOK = A("subject-token");
  const DOM = A("cookie-domain");
  const G = navigator.globalPrivacyControl === true;
  const enc = encodeURIComponent;
  const Q = "cns_q_" + K; // outbox (JSON bodies as strings)
  const LANG = A("lang") || d.documentElement.lang || navigator.language;
  const CK = "cns_cfg_" + K + "_" + LANG; // the last config, for a decision before any network
  const inf = new Set();
  const on = (t, e, f) => t.addEventListener(e, f);
  const now = Date.now();
  let cfg, T, st = {}, ban, pc, opener, po, css;

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
  const each = (f) => cfg.purposes.forEach(f);
  const isC = (p) => p.kind == "consent";
  const rd = (f) => (d.body ? f() : on(d, "DOMContentLoaded", f));
  const ck = (s) =>
    (d.cookie =
      s + ";path=/;SameSite=Lax" + (isSecureContext ? ";Secure" : "") + (DOM ? ";domain=" + DOM : ""));

  /* identity: the first-party cookie wins (it may be shared via data-cookie-domain). Read and
     stored when a choice is first sent, so the banner never waits for the cookie jar and no
     identifier is stored before the visitor chooses */
  let aid;
  const id = () => {
    if (!aid) {
      aid = (d.cookie.match(/(?:^|;\s*)consent_aid=([\w-]+)/) || [])[1] || sg("cns_aid") || "a_" + rid();
      sp("cns_aid", aid);
      ck("consent_aid=" + aid + ";max-age=31536000");
    }
    return aid;
  };

  /* stored answers: st = {purpose: {decision, ask, g}} per tenant; R = time of the last refusal */
  const cool = () => now - sg("cns_r_" + cfg.tenant) < cfg.cooldown_days * 864e5;
  // a material version (a new ask label) re-asks a yes, never a no (the server keeps a denial
  // or withdrawal as it is); a missing answer is asked, except during a refusal's cooldown
  const yes = (x) => /^[ga]/.test(x.decision);
  const need = (p, x = st[p.key]) => (x ? x.ask != p.ask && yes(x) : !cool());
  // under GPC a grant counts only if it was given while the signal was on
  const get = (k) => {
    const x = st[k], p = cfg && cfg.purposes.find((p) => p.key == k);
    return x && (!p || ((p.ask == x.ask || !yes(x)) && !(G && p.gpc && !x.g && x.decision == "granted")))
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

  /* blocked content: <script type="text/plain" data-consent|data-category="purpose"> runs once
     granted; <iframe data-consent data-src> loads once granted, with a click-to-load button */
  const act = () =>
    cfg &&
    d.querySelectorAll("[data-consent],[data-category]").forEach((o) => {
      const k = o.dataset.consent || o.dataset.category, ok = get(k) == "granted";
      if (o.type == "text/plain" && ok) {
        // a clone keeps every attribute, the nonce and the text; an empty type is JavaScript
        const n = o.cloneNode(1);
        n.type = "";
        n.async = o.hasAttribute("async");
        o.replaceWith(n);
      } else if (o.dataset.src) {
        o.hidden = !ok;
        if (ok) {
          o.src = o.dataset.src;
          delete o.dataset.src;
          o.cnsP?.remove();
        } else if (!o.cnsP) {
          o.cnsP = btn("load", T.load, () => rec({ [k]: "granted" }));
          o.before(o.cnsP);
        }
      }
    });

  // Consent Mode (Google; Microsoft UET and Clarity): a signal is granted only if every purpose
  // that maps to it is granted
  const sig = () => {
    const f = (r, ps = cfg.purposes.filter((p) => r.test(p.key))) =>
        ps[0] && ps.every((p) => get(p.key) == "granted") ? "granted" : "denied",
      a = f(/(^|_)ads?(_|$)|advert|market/i),
      n = f(/analytic|statistic|measure/i);
    B("gcm") &&
      w.gtag?.("consent", "update", {
        ad_storage: a,
        ad_user_data: a,
        ad_personalization: a,
        analytics_storage: n,
      });
    B("uet") && (w.uetq = w.uetq || []).push("consent", "update", { ad_storage: a });
    B("clarity") && w.clarity?.("consentv2", { ad_Storage: a, analytics_Storage: n });
  };

  const emit = (m = {}) => {
    each((p) => (m[p.key] = get(p.key)));
    d.dispatchEvent(new CustomEvent("consent:change", { detail: m }));
    act();
    sig();
  };

  /* record {purpose: decision}: only new, changed or re-asked answers are sent; a purpose
     leaving "granted" loses the cookies its disclosures name */
  const wipe = (k) =>
    cfg.cookies.forEach((c) =>
      c.purpose == k &&
      d.cookie.split(/;\s*/).forEach((s) => {
        s = s.split("=")[0];
        // a disclosed name may end in * (a prefix, e.g. _ga_*)
        RegExp("^" + c.name.replace("*", ".*") + "$").test(s) && ck(s + "=;max-age=0");
      })
    );
  const rec = (m, ch = []) => {
    each((p) => {
      const v = m[p.key], x = st[p.key];
      if (v && (!x || x.ask != p.ask || x.decision != v)) {
        get(p.key) == "granted" && v != "granted" && wipe(p.key);
        st[p.key] = { decision: v, ask: p.ask, g: G };
        ch.push({ purpose: p.key, decision: v, idempotency_key: rid() });
      }
    });
    if (ch[0]) {
      sp("cns_st_" + cfg.tenant, st);
      const b = JSON.stringify({
        anonymous_id: id(),
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
  const btn = (k, l, f, s, a) => {
    const b = h("button", { type: "button", class: s ? "cns-s" : "", "data-cns": k, ...a }, l);
    b.onclick = f;
    return b;
  };
  // theme: brand colour, radius and font as custom properties (CSSOM, allowed by CSP)
  const ui = (id, a, ...k) => {
    if (!css) {
      css = new CSSStyleSheet();
      css.replaceSync(__CSS__);
      d.adoptedStyleSheets = [...d.adoptedStyleSheets, css];
    }
    const t = cfg.theme,
      e = h(
        "div",
        {
          id: "cns-" + id,
          class: "cns-ui cns-" + t.layout + " cns-" + t.mode,
          role: "dialog",
          lang: cfg.lang,
          dir: cfg.dir,
          tabindex: -1,
          ...a,
        },
        ...k
      );
    e.style.cssText = "--cns-b:" + t.brand + ";--cns-r:" + t.radius + "px" + (t.font ? ";--cns-f:" + t.font : "");
    return e;
  };
  const gpcN = () => G && cfg.purposes.some((p) => p.gpc) && h("p", { class: "cns-g" }, T.gpc_notice);
  // only http(s) policy links; target=_blank implies noopener
  const policy = (u = cfg.policy.url) =>
    /^https?:\/\//i.test(u) && h("a", { href: u, target: "_blank" }, T.policy);

  const done = (m, r) => {
    r && sp("cns_r_" + cfg.tenant, now);
    rec(m);
    ban?.remove();
    ban = 0;
    close(1);
  };
  // accept all never opts in a gpc purpose while GPC is on (it stays denied)
  const all = (v) => () => {
    const m = {};
    each((p) => (m[p.key] = isC(p) ? (v < "e" || !(G && p.gpc)) && v : "acknowledged"));
    done(m, v < "e");
  };
  // nothing left to ask (every consent purpose GPC-denied): only an acknowledgement
  const btns = (x, c = cfg.purposes.some((p) => isC(p) && !(G && p.gpc))) =>
    h(
      "div",
      { class: "cns-r" },
      btn("accept", c ? T.accept_all : T.acknowledge, all("granted")),
      c && btn("reject", T.reject_all, all("denied")),
      x
    );

  const banner = () => {
    ban = ui(
      "banner",
      { "aria-labelledby": "cns-bt", "aria-describedby": "cns-bd" },
      h("h2", { id: "cns-bt" }, T.title),
      h("p", { id: "cns-bd" }, T.body),
      gpcN(),
      btns(btn("prefs", T.settings, open, 1)),
      policy()
    );
    // Escape does not dismiss: the question stays until it is answered
    rd(() => {
      // first in <body> so keyboard users reach it first; fixed, so no layout shift
      d.body.prepend(ban);
      ban.focus();
    });
  };

  const focusables = () => pc.querySelectorAll("input:not([disabled]),button,summary,a[href]");
  const close = (c) => {
    if (pc) {
      pc.remove();
      pc = 0;
      if (ban && !c) ban.hidden = false;
      opener?.focus();
    }
  };
  const save = () => {
    const m = {};
    let r;
    each((p) => (m[p.key] = "acknowledged"));
    pc.querySelectorAll("input:not([disabled])").forEach(
      (i) => (m[i.dataset.cnsPurpose] = i.checked ? "granted" : ((r = 1), "denied"))
    );
    done(m, r);
  };
  const table = (c) =>
    c[0] &&
    h(
      "details",
      0,
      h("summary", 0, T.cookies_heading),
      h(
        "table",
        0,
        h("tr", 0, ...[T.col_cookie, T.col_provider, T.col_lifetime].map((x) => h("th", 0, x))),
        ...c.map((x) =>
          h(
            "tr",
            0,
            h("td", 0, h("bdi", 0, x.name), h("br"), x.description),
            h("td", 0, x.provider),
            h("td", 0, x.lifetime_text)
          )
        )
      )
    );

  function open() {
    if (!cfg) return (po = 1);
    if (pc) return;
    opener = d.activeElement;
    if (ban) ban.hidden = true;
    pc = ui(
      "prefs",
      { "aria-modal": "true", "aria-labelledby": "cns-pt" },
      h(
        "div",
        { class: "cns-pn" },
        h(
          "div",
          { class: "cns-hd" },
          h("h2", { id: "cns-pt" }, T.settings),
          btn("close", "\u00d7", () => close(), 1, { "aria-label": T.close })
        ),
        gpcN(),
        ...cfg.purposes.map((p) => {
          const id = "cns-p-" + p.key,
            i = h("input", {
              type: "checkbox",
              role: "switch",
              "data-cns-purpose": p.key,
              "aria-describedby": id,
            });
          // on only to show the visitor's own earlier grant, never by default; notice purposes
          // are shown, and announced, as always on
          isC(p) ? (i.checked = get(p.key) == "granted") : (i.checked = i.disabled = true);
          return h(
            "div",
            { class: "cns-i" },
            h("label", 0, h("span", 0, p.title, !isC(p) && h("small", 0, T.always_on)), i),
            h("p", { id }, p.description),
            table(cfg.cookies.filter((c) => c.purpose == p.key))
          );
        }),
        btns(btn("save", T.save, save, 1)),
        policy()
      )
    );
    on(pc, "keydown", (e) => {
      if (e.key == "Escape") {
        // back to the banner (still unanswered) or to the page (already answered)
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
      pc.focus();
    });
  }

  const use = (b) => {
    cfg = b;
    T = b.texts;
    st = sg("cns_st_" + b.tenant) || {};
    act();
    sig();
  };

  const C = sg(CK);
  C && use(C); // apply stored answers before the network answers
  flush();
  on(w, "online", flush);
  on(w, "pagehide", flush);
  on(d, "click", (e) => {
    e.target.closest?.("[data-consent-open]") && (e.preventDefault(), open());
  });
  // content that a single-page app adds later is held back too
  new MutationObserver(act).observe(d.documentElement, { childList: true, subtree: true });

  // the embedded config when it is in the page's language, else one request
  const ready = (
    E && !LANG.toLowerCase().indexOf(E.lang)
      ? Promise.resolve(E)
      : fetch(API + "/v1/snippet/config?key=" + enc(K) + "&lang=" + enc(LANG)).then((r) => (r.ok ? r.json() : C))
  )
    .catch(() => C)
    .then((b, m = {}) => {
      if (b) {
        sp(CK, b);
        use(b);
        // GPC: a denial once per purpose + ask label (also over an earlier opt-in), never asked
        G && each((p) => isC(p) && p.gpc && !get(p.key) && (m[p.key] = "denied"));
        rec(m);
        cfg.purposes.some((p) => need(p)) && banner();
        po && open();
      }
    });
  w.Consent = {
    get,
    // listeners ride on the DOM event, so one that throws cannot break others
    on: (e, f) => on(d, "consent:" + e, (x) => f(x.detail)),
    open,
    ready,
  };
  // calls made to the inline stub before the snippet arrived
  if (stub) {
    stub.q.forEach(([c, ...a]) => w.Consent[c](...a));
    stub.r(ready);
  }
})(window, document);
