// Build dist/snippet.js: minify src/snippet.css, inline it into src/snippet.js,
// minify the JS, print sizes and fail if gzip exceeds the budget.
//   node build.mjs          build (writes dist/snippet.js)
//   node build.mjs --check  verify dist/snippet.js is up to date (no write)
// Output is deterministic for a given esbuild version (pinned in package-lock.json).
import { readFileSync, writeFileSync, mkdirSync, existsSync } from "node:fs";
import { gzipSync, brotliCompressSync, constants as Z } from "node:zlib";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { transform } from "esbuild";

const BUDGET = 4096; // gzip bytes, hard limit
const TARGET = 3072; // gzip bytes, aim
const root = dirname(fileURLToPath(import.meta.url));
const out = join(root, "dist", "snippet.js");
const check = process.argv.includes("--check");

const css = (
  await transform(readFileSync(join(root, "src", "snippet.css"), "utf8"), {
    loader: "css",
    minify: true,
    legalComments: "none",
  })
).code.trim();

const js = (
  await transform(readFileSync(join(root, "src", "snippet.js"), "utf8"), {
    loader: "js",
    minify: true,
    target: "es2020",
    legalComments: "none",
    charset: "utf8",
    define: { __CSS__: JSON.stringify(css) },
  })
).code;

const buf = Buffer.from(js, "utf8");
const gz = gzipSync(buf, { level: 9 }).length;
const br = brotliCompressSync(buf, {
  params: { [Z.BROTLI_PARAM_QUALITY]: 11, [Z.BROTLI_PARAM_SIZE_HINT]: buf.length },
}).length;
console.log(`dist/snippet.js  raw ${buf.length} B  gzip ${gz} B  brotli ${br} B  (gzip budget ${BUDGET}, aim ${TARGET})`);

let fail = false;
if (gz > BUDGET) {
  console.error(`FAIL: gzip size ${gz} B exceeds budget ${BUDGET} B`);
  fail = true;
} else if (gz > TARGET) {
  console.warn(`warning: gzip size ${gz} B is above the ${TARGET} B aim`);
}
if (check) {
  if (!existsSync(out) || readFileSync(out, "utf8") !== js) {
    console.error("FAIL: dist/snippet.js is out of date; run `node build.mjs`");
    fail = true;
  } else console.log("dist/snippet.js is up to date");
} else if (!fail) {
  mkdirSync(dirname(out), { recursive: true });
  writeFileSync(out, js);
}
process.exit(fail ? 1 : 0);
