// Checks what sockets receive against docs/asyncapi.yaml: every event, and every ack of the
// client events, must match the schema of its message there.
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Parser } from '@asyncapi/parser';
import Ajv from 'ajv';

const file = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../docs/asyncapi.yaml');

/** Parses the document (refusing it on any error the parser reports) and compiles one
 * validator per message, by its key in `components.messages`. */
export async function loadSchemas() {
  const { document, diagnostics } = await new Parser().parse(readFileSync(file, 'utf8'));
  const errors = diagnostics.filter((d) => d.severity === 0);
  if (!document || errors.length) {
    throw new Error(`docs/asyncapi.yaml is not valid AsyncAPI: ${JSON.stringify(errors, null, 1)}`);
  }
  const ajv = new Ajv({ allErrors: true, strict: false });
  const validators = new Map();
  for (const message of document.components().messages()) {
    validators.set(message.id(), ajv.compile(message.payload().json()));
  }
  return { document, validators };
}

/** Records every event `socket` receives and every ack of its `emitWithAck`, checked
 * against the schemas; `checker.problems` lists what did not match, `checker.seen` what was
 * checked (by message). */
export function watch(socket, { validators }, checker) {
  const check = (id, payload) => {
    const validate = validators.get(id);
    if (!validate) {
      checker.problems.push(`${id}: not described in docs/asyncapi.yaml`);
      return;
    }
    checker.seen.set(id, (checker.seen.get(id) || 0) + 1);
    if (!validate(payload)) {
      checker.problems.push(`${id} ${JSON.stringify(payload)}: ${JSON.stringify(validate.errors)}`);
    }
  };
  socket.onAny((event, payload) => check(event, payload));
  const emitWithAck = socket.emitWithAck.bind(socket);
  socket.emitWithAck = async (event, ...args) => {
    const ack = await emitWithAck(event, ...args);
    const replies = { join_room: 'join_room_ack', send_message: 'send_message_ack', get_presence: 'get_presence_ack' };
    check(replies[event] || 'ok_ack', ack);
    return ack;
  };
  return socket;
}
