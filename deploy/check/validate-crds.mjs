// Validates rendered custom resources against their published CRD schemas, with the
// @kubernetes-models packages (generated from KEDA's and the Prometheus Operator's CRDs):
//
// 1. schema: each package's validator (JSON Schema from the CRD: types, enums, required fields);
// 2. strict: the same packages' TypeScript types, through TypeScript's excess-property check, so
//    that an unknown or misspelled field fails too (the CRD schemas themselves allow unknown
//    fields, which the API server would silently prune).
//
//   node validate-crds.mjs <node_modules dir> < objects.json
//
// Input: a JSON array of {"source": "...", "object": {...}}. Prints one line per object and
// exits 1 when any object fails or has an apiVersion/kind no package here knows.
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { pathToFileURL } from "node:url";

const modules = process.argv[2];
const groups = {
  "keda.sh/v1alpha1": "@kubernetes-models/keda/keda.sh/v1alpha1",
  "monitoring.coreos.com/v1": "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1",
};
const loaded = {};
for (const [apiVersion, path] of Object.entries(groups)) {
  loaded[apiVersion] = await import(pathToFileURL(join(modules, path, "index.js")).href);
}
const ts = (await import(pathToFileURL(join(modules, "typescript/lib/typescript.js")).href)).default;

const input = JSON.parse(readFileSync(0, "utf8"));
const label = ({ source, object }) => `${source}: ${object.kind}/${object.metadata?.name}`;
const problems = input.map(() => []);

// 1. The CRD's JSON Schema.
input.forEach((item, i) => {
  const { object } = item;
  const Model = loaded[object.apiVersion]?.[object.kind];
  if (!Model) {
    problems[i].push(`no CRD schema here for ${object.apiVersion} ${object.kind}`);
    return;
  }
  try {
    new Model(object).validate();
  } catch (e) {
    const details = (e.errors ?? []).map((x) => `${x.instancePath || "/"} ${x.message}`).join("; ");
    problems[i].push(details || e.message);
  }
});

// 2. Unknown fields: one typed constant per object, one object per line.
const dir = join(dirname(modules), "strict-check");
mkdirSync(dir, { recursive: true });
const imports = [];
const lines = [];
input.forEach(({ object }, i) => {
  const group = groups[object.apiVersion];
  if (!group || !loaded[object.apiVersion]?.[object.kind]) {
    lines.push("");
    return;
  }
  imports.push(`import type { I${object.kind} as T${i} } from "${group}/${object.kind}";`);
  lines.push(`export const o${i}: T${i} = ${JSON.stringify(object)};`);
});
const file = join(dir, "objects.ts");
writeFileSync(file, [...lines, ...imports].join("\n") + "\n");
const program = ts.createProgram([file], {
  strict: true,
  noEmit: true,
  skipLibCheck: true,
  module: ts.ModuleKind.NodeNext,
  moduleResolution: ts.ModuleResolutionKind.NodeNext,
  target: ts.ScriptTarget.ES2022,
});
for (const d of ts.getPreEmitDiagnostics(program)) {
  const message = ts.flattenDiagnosticMessageText(d.messageText, " ");
  if (d.file && d.file.fileName === file && d.start !== undefined) {
    const line = d.file.getLineAndCharacterOfPosition(d.start).line;
    if (line < input.length) {
      problems[line].push(`strict: ${message}`);
      continue;
    }
  }
  problems.forEach((p) => p.push(`strict check could not run: ${message}`));
}

let failed = 0;
input.forEach((item, i) => {
  if (problems[i].length) {
    failed++;
    console.log(`FAIL ${label(item)}: ${problems[i].join("; ")}`);
  } else {
    console.log(`ok   ${label(item)} (${item.object.apiVersion}, schema and strict)`);
  }
});
process.exit(failed ? 1 : 0);
