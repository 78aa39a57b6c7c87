// Build-once nodes (they probe a model or fit a map, then their output is reused) start with their
// seed's "control after generate" on "fixed", so a second Run hits ComfyUI's cache instead of
// re-probing. The front end gives every INT input named "seed" that control with "randomize";
// only a node created now is changed: a loaded workflow keeps the value it was saved with.
import { app } from "../../scripts/app.js";

const BUILD_ONCE = new Set([
  "FS_ELBOScheduleOptimizer",
  "FS_DPMOTTargetsFromLatents",
  "FS_DPMOTTargetsSelfGenerate",
  "FS_DPMOTFitMap",
]);

app.registerExtension({
  name: "fs.fixedSeed",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!BUILD_ONCE.has(nodeData?.name)) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      const seed = this.widgets?.find((w) => w.name === "seed");
      for (const control of seed?.linkedWidgets ?? []) {
        if (control.options?.values?.includes?.("fixed")) control.value = "fixed";
      }
      return result;
    };
  },
});
