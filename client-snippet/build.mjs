// Build dist/snippet.css (minified src/snippet.css) and dist/snippet.js (minified, with the
// stylesheet inlined), print sizes and fail if JS + CSS gzip exceeds the budget.
// esbuild inlines the stylesheet and minifies; terser then compresses again (two passes: it
// inlines single-use helpers and joins statements esbuild leaves apart, about 100 B gzip).
//   node build.mjs          build (writes dist/snippet.js and dist/snippet.css)
//   node build.mjs --check  verify both are up to date (no write)
// Output is deterministic for given esbuild and terser versions (pinned in package-lock.json).
// The script ends with the call `(window,document)`: the per-tenant script
// (/v1/snippet/{key}.js, consent/snippet_bundle.py) passes the key and config into it.
import { readFileSync, writeFileSync, mkdirSync, existsSync } from "node:fs";
import { gzipSync, brotliCompressSync, constants as Z } from "node:zlib";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { transform } from "esbuild";
import { minify } from "terser";

const BUDGET = 4096; // gzip bytes of JS + CSS, hard limit
const TARGET = 3584; // gzip bytes of JS + CSS, aim
const root = dirname(fileURLToPath(import.meta.url));
const out = join(root, "dist", "snippet.js");
const outCss = join(root, "dist", "snippet.css");
const check = process.argv.includes("--check");

const css = (
  await transform(readFileSync(join(root, "src", "snippet.css"), "utf8"), {
    loader: "css",
    minify: true,
    legalComments: "none",
  })
).code.trim();

const esbuilt = (
  await transform(readFileSync(join(root, "src", "snippet.js"), "utf8"), {
    loader: "js",
    minify: true,
    target: "es2020",
    legalComments: "none",
    charset: "utf8",
    define: { __CSS__: JSON.stringify(css) },
  })
).code;
// The script ends with the call `(window,document)`; the per-tenant script passes two more
// arguments (key, config). Shown to terser as globals, or it would see them always undefined
// and drop the code that reads them.
const HOOK = "(window,document)";
const OPEN = "(window,document,EK,E)";
if (esbuilt.split(HOOK).length != 2) throw new Error(`the script must call ${HOOK} once`);
const js =
  (
    await minify(esbuilt.replace(HOOK, OPEN), {
      ecma: 2020,
      compress: { passes: 2 },
      mangle: true,
      format: { ecma: 2020, ascii_only: false, comments: false },
    })
  ).code.replace(OPEN, HOOK) + "\n";

let gz = 0;
// the budget counts snippet.js, which carries the stylesheet; snippet.css (the same rules, for
// a site that links them itself) is printed for scale
for (const [name, text] of [["snippet.js", js], ["snippet.css", css]]) {
  const buf = Buffer.from(text, "utf8");
  const g = gzipSync(buf, { level: 9 }).length;
  const br = brotliCompressSync(buf, {
    params: { [Z.BROTLI_PARAM_QUALITY]: 11, [Z.BROTLI_PARAM_SIZE_HINT]: buf.length },
  }).length;
  gz ||= g;
  console.log(`dist/${name}  raw ${buf.length} B  gzip ${g} B  brotli ${br} B`);
}
console.log(`JS (with CSS) gzip ${gz} B  (budget ${BUDGET}, aim ${TARGET})`);

let fail = !js.trimEnd().endsWith(HOOK + ";");
if (fail) console.error(`FAIL: dist/snippet.js must end with the call ${HOOK}`);
if (gz > BUDGET) {
  console.error(`FAIL: gzip size ${gz} B exceeds budget ${BUDGET} B`);
  fail = true;
} else if (gz > TARGET) {
  console.warn(`warning: gzip size ${gz} B is above the ${TARGET} B aim`);
}
if (check) {
  if (!existsSync(out) || readFileSync(out, "utf8") !== js || !existsSync(outCss) || readFileSync(outCss, "utf8") !== css) {
    console.error("FAIL: dist/ is out of date; run `node build.mjs`");
    fail = true;
  } else console.log("dist/snippet.js is up to date");
} else if (!fail) {
  mkdirSync(dirname(out), { recursive: true });
  writeFileSync(out, js);
  writeFileSync(outCss, css);
}
process.exit(fail ? 1 : 0);
