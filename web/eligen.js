// ComfyUI-EliGen in the page: what the frontend does not do by itself for this package.
//
// - A LoRA that EliGen Train LoRA just saved appears in every LoRA list (stock loaders, EliGen LoRA
//   Loader; nodes already on the canvas and new ones) without Refresh or a reload: the trainer's node
//   output carries `eligen_lora_saved`, and the page then reloads the node definitions through the
//   frontend's own app.refreshComboInNodes() (the "Refresh Node Definitions" command).
// - The package's template cards keep the order of their numbered names: the frontend shows extension
//   templates in the order the server lists them, which is the file system's.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

// The folder name ComfyUI serves this file under (/extensions/<pack>/eligen.js) is the one it lists
// the pack's templates under.
const PACK = decodeURIComponent(new URL(import.meta.url).pathname.split("/").slice(-2)[0]);

function byNumberedName(a, b) {
  return a.localeCompare(b, undefined, { numeric: true, sensitivity: "base" });
}

if (typeof api.getWorkflowTemplates === "function") {
  const listTemplates = api.getWorkflowTemplates.bind(api);
  api.getWorkflowTemplates = async () => {
    const templates = await listTemplates();
    if (templates && Array.isArray(templates[PACK])) templates[PACK] = [...templates[PACK]].sort(byNumberedName);
    return templates;
  };
}

app.registerExtension({
  name: "EliGen.FreshLoraLists",
  setup() {
    if (typeof app.refreshComboInNodes !== "function") {
      console.warn("EliGen: this frontend has no app.refreshComboInNodes; use Refresh after training a LoRA");
      return;
    }
    api.addEventListener("executed", ({ detail }) => {
      if (detail?.output?.eligen_lora_saved) app.refreshComboInNodes();
    });
  },
});
