// Validates the Prometheus Operator resources of rendered manifests (read from the files
// given) against the operator's schemas, from @kubernetes-models/prometheus-operator.
// Exits 1 when one is invalid, or when none was found (so the check cannot pass vacuously).
import { readFileSync } from 'node:fs';
import { parseAllDocuments } from 'yaml';
import { ServiceMonitor, PrometheusRule } from '@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1';

const kinds = { ServiceMonitor, PrometheusRule };
let checked = 0;
let failed = 0;
for (const file of process.argv.slice(2)) {
  for (const doc of parseAllDocuments(readFileSync(file, 'utf8'))) {
    const object = doc.toJS();
    const Model = object && kinds[object.kind];
    if (!Model || object.apiVersion !== 'monitoring.coreos.com/v1') continue;
    checked += 1;
    try {
      new Model(object).validate();
      console.log(`ok ${object.kind}/${object.metadata.name}`);
    } catch (error) {
      failed += 1;
      console.error(`invalid ${object.kind}/${object.metadata?.name}: ${error.message}`);
    }
  }
}
if (checked === 0) {
  console.error('no ServiceMonitor or PrometheusRule found');
  process.exit(1);
}
process.exit(failed ? 1 : 0);
