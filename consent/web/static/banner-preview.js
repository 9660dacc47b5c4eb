// The dashboard's banner preview: show the banner on every load, as to a first visit, by
// forgetting what an earlier preview stored for this tenant and the preview key.
(() => {
  const s = document.currentScript;
  const tenant = s.dataset.tenant;
  const key = s.dataset.key;
  try {
    for (const k of Object.keys(localStorage)) {
      if (k === "cns_st_" + tenant || k === "cns_r_" + tenant || k.startsWith("cns_cfg_" + key + "_")
          || k === "cns_q_" + key) {
        localStorage.removeItem(k);
      }
    }
  } catch (e) { /* storage off: nothing was kept */ }
})();
